"""How each fine-tuning strategy fits a :class:`~bids_roimae.model.classifier.Classifier`.

Three strategies (``cfg.finetune.strategy``):

``linear-probe``
    frozen encoder; a subject's embedding is the mean of its window embeddings; a
    standardised logistic regression (ridge for regression) whose C is chosen by an inner
    cross-validation on the training subjects only.
``head``
    frozen encoder; a small torch head (``cfg.finetune.head``: linear or MLP) trained on
    window embeddings, each window carrying its subject's label.
``full``
    encoder and head trained together on windows, the encoder at ``encoder_lr``, the
    head at ``lr``.

With a frozen encoder, window embeddings are computed once and shared by all folds; the
encoder never saw labels, so sharing them leaks nothing.
"""

from __future__ import annotations

import copy
from typing import Optional, Sequence

import numpy as np
import torch
from torch import nn

from bids_roimae.errors import BadDataError
from bids_roimae.model.classifier import Classifier, build_head, n_outputs
from bids_roimae.training.windows import autocast, embed_windows, load_windows

PROBE_C_GRID = (1e-3, 1e-2, 1e-1, 1.0, 10.0)
RIDGE_ALPHAS = (1e-2, 1e-1, 1.0, 10.0, 100.0, 1000.0)
#: Above this many features the penalty grids scale with the dimension: a region readout
#: gives thousands of standardised features for tens of subjects, and the data term of
#: the fit grows with the number of features while the penalty does not.
GRID_FEATURES = 256


def penalty_grids(n_features: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Logistic C values and ridge alphas searched by the inner CV for ``n_features``."""
    factor = min(1.0, GRID_FEATURES / max(1, n_features))
    return (tuple(c * factor for c in PROBE_C_GRID),
            tuple(a / factor for a in RIDGE_ALPHAS))


def fit_linear_probe(features: np.ndarray, y: np.ndarray, task_type: str, seed: int
                     ) -> dict:
    """Standardised logistic (or ridge) regression with its penalty chosen by inner CV.

    Parameters
    ----------
    features : ndarray, shape (S, D)
        One embedding per training subject.
    y : ndarray, shape (S,)

    Returns
    -------
    dict
        ``mean``, ``scale`` (D,), ``weight`` (C, D), ``bias`` (C,), ``penalty`` (the chosen
        C or alpha), ready for :class:`Classifier`.
    """
    from threadpoolctl import threadpool_limits

    # Subjects x embedding is a small problem: BLAS threads cost more than they save
    # (several times slower on a busy machine).
    with threadpool_limits(limits=1):
        return _fit_linear_probe(features, y, task_type, seed)


def _fit_linear_probe(features, y, task_type, seed) -> dict:
    from sklearn.linear_model import LogisticRegression, RidgeCV
    from sklearn.model_selection import GridSearchCV, StratifiedKFold

    features = np.asarray(features, np.float64)
    mean = features.mean(axis=0)
    scale = features.std(axis=0)
    scale[scale < 1e-8] = 1.0  # constant features: leave them at zero
    z = (features - mean) / scale
    c_grid, alphas = penalty_grids(z.shape[1])
    if task_type == "regression":
        model = RidgeCV(alphas=alphas).fit(z, y)
        weight, bias, penalty = model.coef_[None, :], np.atleast_1d(model.intercept_), \
            float(model.alpha_)
    else:
        smallest = int(np.unique(y, return_counts=True)[1].min())
        base = LogisticRegression(class_weight="balanced", max_iter=2000)
        if smallest >= 2:
            inner = StratifiedKFold(n_splits=min(3, smallest), shuffle=True, random_state=seed)
            search = GridSearchCV(base, {"C": list(c_grid)}, cv=inner,
                                  scoring="neg_log_loss").fit(z, y)
            model, penalty = search.best_estimator_, float(search.best_params_["C"])
        else:  # too few subjects in a class for an inner split: a moderate default
            penalty = float(c_grid[len(c_grid) // 2 + 1])
            model = base.set_params(C=penalty).fit(z, y)
        weight, bias = model.coef_, model.intercept_
    return {"mean": mean.astype(np.float32), "scale": scale.astype(np.float32),
            "weight": np.asarray(weight, np.float32), "bias": np.asarray(bias, np.float32),
            "penalty": penalty}


def probe_classifier(encoder: nn.Module, probe: dict, label_info: dict) -> Classifier:
    """Wrap a fitted linear probe as a :class:`Classifier` (coefficients copied)."""
    weight = torch.from_numpy(probe["weight"])
    head = nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        head.weight.copy_(weight)
        head.bias.copy_(torch.from_numpy(probe["bias"]))
    return Classifier(encoder, head, weight.shape[1], probe["mean"], probe["scale"],
                      label_info=label_info)


def _loss_fn(task_type: str, y: np.ndarray, n_classes: int) -> nn.Module:
    """Class-balanced loss so a majority class cannot win by default."""
    if task_type == "binary":
        n_pos = max(1, int(np.sum(y == 1)))
        return nn.BCEWithLogitsLoss(pos_weight=torch.tensor([(y.size - n_pos) / n_pos]))
    if task_type == "multiclass":
        counts = np.bincount(y.astype(int), minlength=n_classes).astype(np.float32)
        weights = np.where(counts > 0, counts.sum() / np.maximum(counts, 1) / n_classes, 0.0)
        return nn.CrossEntropyLoss(weight=torch.from_numpy(weights.astype(np.float32)))
    return nn.MSELoss()


def _targets(task_type: str, y: np.ndarray, target_mean: float, target_scale: float
             ) -> torch.Tensor:
    if task_type == "multiclass":
        return torch.as_tensor(y, dtype=torch.long)
    if task_type == "regression":
        return torch.as_tensor((y - target_mean) / target_scale, dtype=torch.float32)[:, None]
    return torch.as_tensor(y, dtype=torch.float32)[:, None]


def train_classifier(encoder: nn.Module, window_refs: Sequence, window_y: np.ndarray,
                     cfg, label_info: dict, device, *, seed: int,
                     window_embeddings: Optional[np.ndarray] = None) -> Classifier:
    """Train a head (``strategy="head"``) or encoder + head (``"full"``) on windows.

    Parameters
    ----------
    encoder : nn.Module
        Pretrained encoder; deep-copied for ``full`` so the caller's weights stay intact.
    window_refs : sequence of (entry, start), length K
        Training windows (all of them belong to training subjects).
    window_y : ndarray, shape (K,)
        Label of each window's subject.
    cfg : AppConfig
        ``cfg.finetune`` (strategy, head, epochs, batch_size, lr, encoder_lr,
        weight_decay) and ``cfg.geometry.window``.
    window_embeddings : ndarray, shape (K, D), optional
        Precomputed frozen embeddings (``head`` only; computed when omitted).
    """
    ft, W = cfg.finetune, cfg.geometry.window
    task = label_info["task_type"]
    full = ft.strategy == "full"
    device = torch.device(device)
    gen = torch.Generator().manual_seed(int(seed))
    torch.manual_seed(int(seed))
    window_y = np.asarray(window_y)
    if window_embeddings is None:
        window_embeddings = embed_windows(encoder, window_refs, W, ft.batch_size, device)
    emb = np.asarray(window_embeddings, np.float32)
    mean, scale = emb.mean(axis=0), emb.std(axis=0)
    scale[scale < 1e-8] = 1.0
    t_mean = float(window_y.mean()) if task == "regression" else 0.0
    t_scale = (float(window_y.std()) or 1.0) if task == "regression" else 1.0
    n_classes = len(label_info.get("classes", [])) or 2
    head = build_head(ft.head, emb.shape[1], n_outputs(task, n_classes))
    model = Classifier(copy.deepcopy(encoder) if full else encoder, head, emb.shape[1],
                       mean, scale, t_mean, t_scale, label_info).to(device)
    groups = [{"params": model.head.parameters(), "lr": ft.lr}]
    if full:
        groups.append({"params": model.encoder.parameters(), "lr": ft.encoder_lr})
    else:
        model.encoder.requires_grad_(False)
    optim = torch.optim.AdamW(groups, weight_decay=ft.weight_decay)
    loss_fn = _loss_fn(task, window_y, n_classes).to(device)
    targets = _targets(task, window_y, t_mean, t_scale)
    features = torch.from_numpy(emb)
    for _epoch in range(int(ft.epochs)):
        model.head.train()
        model.encoder.train(full)
        for idx in torch.randperm(len(window_y), generator=gen).split(max(1, ft.batch_size)):
            if full:
                x = torch.from_numpy(load_windows([window_refs[i] for i in idx], W)).to(device)
                with autocast(device):
                    out = model.head(
                        (model.encoder.embed(x).float() - model.feature_mean)
                        / model.feature_scale)
            else:
                out = model.head((features[idx].to(device) - model.feature_mean)
                                 / model.feature_scale)
            loss = loss_fn(out.float(), targets[idx].to(device))
            if not torch.isfinite(loss):
                raise BadDataError("fine-tuning loss became non-finite (NaN/inf); lower "
                                   "--lr or check the prepared data")
            optim.zero_grad(set_to_none=True)
            loss.backward()
            optim.step()
    model.eval()
    model.encoder.requires_grad_(True)
    return model


@torch.no_grad()
def window_logits(classifier: Classifier, refs: Sequence, window: int, batch_size: int,
                  device, embeddings: Optional[np.ndarray] = None
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Logits (K, C) and raw embeddings (K, D) of windows (embeddings reused if given)."""
    classifier.eval()
    if embeddings is None:
        embeddings = embed_windows(classifier.encoder, refs, window, batch_size, device)
    emb = torch.from_numpy(np.asarray(embeddings, np.float32)).to(device)
    return classifier.head_forward(emb).float().cpu().numpy(), np.asarray(embeddings)
