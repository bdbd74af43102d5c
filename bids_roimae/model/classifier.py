"""The fine-tuned classifier and how each strategy fits it (no I/O beyond cache reads).

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

Every strategy ends as a :class:`Classifier` (encoder + standardisation + head) whose
``forward`` maps windows to logits, so attribution differentiates through the same model
that made the prediction. A subject's prediction averages its window logits (for the
linear probe that equals the logit of its mean embedding); windows are up to
``windows_per_run`` evenly spaced windows of each run.

With a frozen encoder, window embeddings are computed once and shared by all folds; the
encoder never saw labels, so sharing them leaks nothing.
"""

from __future__ import annotations

import copy
import logging
import math
from collections import defaultdict
from typing import Optional, Sequence

import numpy as np
import torch
from torch import nn

from bids_roimae.errors import BadDataError

log = logging.getLogger(__name__)

STRATEGIES = ("linear-probe", "head", "full")
PROBE_C_GRID = (1e-3, 1e-2, 1e-1, 1.0, 10.0)
RIDGE_ALPHAS = (1e-2, 1e-1, 1.0, 10.0, 100.0, 1000.0)


# -- windows ----------------------------------------------------------------------------
def window_starts(n_frames: int, window: int, per_run: int) -> np.ndarray:
    """Start frames of up to ``per_run`` evenly spaced windows of ``window`` frames.

    A run shorter than one window gives none; windows overlap only when the run is
    shorter than ``per_run`` windows laid end to end.
    """
    if n_frames < window or per_run < 1:
        return np.zeros(0, dtype=np.int64)
    last = n_frames - window
    count = min(per_run, last + 1)
    return np.unique(np.round(np.linspace(0, last, count)).astype(np.int64))


def subject_windows(entries: Sequence, window: int, per_run: int
                    ) -> dict[str, list[tuple[object, int]]]:
    """``{subject: [(entry, start), ...]}`` over every run of every subject.

    Runs shorter than a window are skipped with a warning; subjects left without any
    window are absent from the result.
    """
    out: dict[str, list] = defaultdict(list)
    for entry in entries:
        starts = window_starts(int(entry.n_frames), window, per_run)
        if starts.size == 0:
            log.warning("%s has %d frames, fewer than one window of %d: skipped",
                        entry.run_key, entry.n_frames, window)
        out[str(entry.subject)].extend((entry, int(s)) for s in starts)
    return {s: refs for s, refs in sorted(out.items()) if refs}


def load_windows(refs: Sequence[tuple[object, int]], window: int) -> np.ndarray:
    """Read windows from cache entries: float32 array of shape (K, W, N, P)."""
    if not refs:
        raise ValueError("no window to load")
    maps = {}  # one memory map per run, however many of its windows are read
    for entry, _ in refs:
        if id(entry) not in maps:
            maps[id(entry)] = entry.tokens()
    shape = maps[id(refs[0][0])].shape[1:]
    out = np.empty((len(refs), window) + tuple(shape), np.float32)
    for k, (entry, start) in enumerate(refs):
        # CacheEntry.window converts float16 (or scaled int8) in one vectorised copy
        entry.window(start, window, out=out[k], tokens=maps[id(entry)])
    return out


def _batches(refs: Sequence, size: int):
    for i in range(0, len(refs), size):
        yield refs[i:i + size]


@torch.no_grad()
def embed_windows(encoder: nn.Module, refs: Sequence, window: int, batch_size: int,
                  device) -> np.ndarray:
    """Encoder embeddings of windows, shape (K, D) float32 (all tokens visible)."""
    encoder.eval()
    out = []
    for chunk in _batches(list(refs), max(1, batch_size)):
        x = torch.from_numpy(load_windows(chunk, window)).to(device)
        with _autocast(device):
            out.append(encoder.embed(x).float().cpu().numpy())
    return np.concatenate(out).astype(np.float32)


def _autocast(device):
    dev = torch.device(device)
    return torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda")


# -- the model --------------------------------------------------------------------------
def build_head(kind: str, embed_dim: int, n_outputs: int) -> nn.Module:
    """``linear``: one linear layer; ``mlp``: Linear-GELU-Dropout-Linear (hidden D/2)."""
    if kind == "linear":
        return nn.Linear(embed_dim, n_outputs)
    if kind == "mlp":
        hidden = max(16, embed_dim // 2)
        return nn.Sequential(nn.Linear(embed_dim, hidden), nn.GELU(), nn.Dropout(0.1),
                             nn.Linear(hidden, n_outputs))
    raise ValueError(f"unknown head {kind!r}; expected linear or mlp")


class Classifier(nn.Module):
    """Encoder + feature standardisation + head, windows in, logits out.

    Parameters
    ----------
    encoder : nn.Module
        A pretrained model with ``embed(x (B, W, N, P)) -> (B, D)``.
    head : nn.Module
        Maps standardised embeddings (B, D) to (B, C).
    feature_mean, feature_scale : tensor, shape (D,)
        Standardisation of embeddings (identity when omitted).
    target_mean, target_scale : float
        Regression: the head predicts ``(y - mean) / scale``; ``forward`` undoes it.
    label_info : dict
        ``target``, ``task_type``, ``classes``, ``positive``, ``negative`` (see
        :func:`bids_roimae.analysis.labels.parse_labels`), used to decode outputs.

    ``forward`` returns (B, C): one logit for binary, C logits for multi-class, the
    predicted value for regression.
    """

    def __init__(self, encoder: nn.Module, head: nn.Module, embed_dim: int,
                 feature_mean=None, feature_scale=None, target_mean: float = 0.0,
                 target_scale: float = 1.0, label_info: Optional[dict] = None):
        super().__init__()
        self.encoder = encoder
        self.head = head
        mean = torch.zeros(embed_dim) if feature_mean is None else torch.as_tensor(feature_mean)
        scale = torch.ones(embed_dim) if feature_scale is None else torch.as_tensor(feature_scale)
        self.register_buffer("feature_mean", mean.float().clone())
        self.register_buffer("feature_scale", scale.float().clone())
        self.register_buffer("target_mean", torch.tensor(float(target_mean)))
        self.register_buffer("target_scale", torch.tensor(float(target_scale)))
        self.label_info = dict(label_info or {})

    @property
    def task_type(self) -> str:
        return self.label_info.get("task_type", "binary")

    def head_forward(self, embedding: torch.Tensor) -> torch.Tensor:
        """Head on raw encoder embeddings (B, D) -> (B, C)."""
        out = self.head((embedding.float() - self.feature_mean) / self.feature_scale)
        if self.task_type == "regression":
            out = out * self.target_scale + self.target_mean
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Windows ``x`` (B, W, N, P) -> logits (B, C)."""
        return self.head_forward(self.encoder.embed(x))


def subject_output(window_logits: np.ndarray, task_type: str) -> np.ndarray:
    """Combine a subject's window logits (K, C) into its prediction.

    Returns P(positive) as shape () for binary, class probabilities (C,) for multi-class,
    the predicted value () for regression; the logits are averaged first.
    """
    mean = np.asarray(window_logits, np.float64).mean(axis=0)
    if task_type == "binary":
        return np.asarray(1.0 / (1.0 + math.exp(-float(mean[0]))))
    if task_type == "multiclass":
        e = np.exp(mean - mean.max())
        return e / e.sum()
    return np.asarray(float(mean[0]))


# -- fitting ----------------------------------------------------------------------------
def n_outputs(task_type: str, n_classes: int) -> int:
    return n_classes if task_type == "multiclass" else 1


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
    if task_type == "regression":
        model = RidgeCV(alphas=RIDGE_ALPHAS).fit(z, y)
        weight, bias, penalty = model.coef_[None, :], np.atleast_1d(model.intercept_), \
            float(model.alpha_)
    else:
        smallest = int(np.unique(y, return_counts=True)[1].min())
        base = LogisticRegression(class_weight="balanced", max_iter=2000)
        if smallest >= 2:
            inner = StratifiedKFold(n_splits=min(3, smallest), shuffle=True, random_state=seed)
            search = GridSearchCV(base, {"C": list(PROBE_C_GRID)}, cv=inner,
                                  scoring="neg_log_loss").fit(z, y)
            model, penalty = search.best_estimator_, float(search.best_params_["C"])
        else:  # too few subjects in a class for an inner split: a moderate default
            model, penalty = base.set_params(C=1.0).fit(z, y), 1.0
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
                with _autocast(device):
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
