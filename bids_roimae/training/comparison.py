"""Paired comparison of models evaluated on the same repeated subject folds.

The question it answers first: does ROI-guided masking pretrain a better encoder than
random masking? More generally, the comparison holds **N named arms**. An arm is anything
that turns a list of folds into out-of-fold predictions and fold metrics (the output of
:func:`~bids_roimae.training.cross_validation.cross_validate`): a pretrained checkpoint
fine-tuned with the run's strategy, or a classical baseline. Arms belong to a *group*
(``roi``, ``random``, ``baseline``); several arms of one group are pretraining seeds.

Every arm runs on the same ``R`` repeats of stratified ``k``-fold splits, so each split
pairs the groups. For every pair of groups (later minus earlier, so ``roi - random``) the
table reports, difference and 95% interval first, p second:

* over the ``R x k`` splits: the Nadeau-Bengio corrected resampled t-test of the
  seed-averaged fold scores (:func:`~bids_roimae.analysis.statistics.corrected_resampled_ttest`);
* over subjects (binary targets): DeLong's test of the AUC and a paired bootstrap of the
  accuracy, on each subject's out-of-fold probability averaged over repeats and seeds.

Beside it, each group's between-fold and between-seed spread: a difference smaller than
the seed spread is not a property of the masking.

Pretrained checkpoints may differ only in masking strategy and seed; anything else
(preset, steps, patch size, ...) is refused with exit 64 naming the settings, unless the
caller allows it, in which case the outputs say what differs.
"""

from __future__ import annotations

import itertools
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import pandas as pd

from bids_roimae.analysis.evaluation import make_repeated_folds, metric_names
from bids_roimae.analysis.statistics import (
    Difference,
    corrected_resampled_ttest,
    delong_test,
    paired_bootstrap,
    spread,
)
from bids_roimae.errors import OutputError, UsageError
from bids_roimae.io.checkpoint import load_model
from bids_roimae.training.baseline import cache_region_series, cross_validate_baseline
from bids_roimae.training.cross_validation import (
    cross_validate,
    frozen_embeddings,
    prepare_inputs,
)
from bids_roimae.training.finetune import check_entries, merged_config, readout_encoder

log = logging.getLogger(__name__)

#: Settings that may differ between compared checkpoints: what is compared, and the seed.
COMPARED_SETTINGS = ("masking.strategy", "seed")
#: Settings that do not change what a pretraining run learns (bookkeeping and speed).
OPERATIONAL_SETTINGS = ("train.checkpoint_every", "train.log_every", "train.compile",
                        "train.num_workers", "train.gpu_resident", "train.val_batches")

FoldSplits = list  # list of (train_idx, test_idx)


@dataclass
class Arm:
    """One model family evaluated on the comparison's folds.

    Attributes
    ----------
    name : str
        Unique name (file names, table rows), e.g. ``roi-seed1``.
    group : str
        What the arm stands for in the comparison, e.g. ``roi``, ``random``, ``baseline``;
        arms of one group are averaged per split (pretraining seeds).
    evaluate : callable
        ``evaluate(labels, folds) -> (predictions, fold_table)`` as
        :func:`~bids_roimae.training.cross_validation.cross_validate` returns them, for the
        labelled subjects ``labels`` (index = subject) and one repeat's ``folds``.
    seed : int, optional
        Pretraining seed (None for arms without one).
    """

    name: str
    group: str
    evaluate: Callable[[pd.Series, FoldSplits], tuple[pd.DataFrame, pd.DataFrame]]
    seed: Optional[int] = None


@dataclass
class ComparisonResult:
    """Everything the comparison measured.

    Attributes
    ----------
    differences : DataFrame
        One row per (metric, group B, group A, test): ``estimate``, ``ci_low``,
        ``ci_high``, ``p``, ``test``, ``n`` (splits or subjects).
    spread : DataFrame
        Per group and metric: ``mean``, ``sd_between_folds``, ``sd_between_seeds``,
        ``n_seeds``, ``n_splits``.
    scores : DataFrame
        Long table: ``arm``, ``group``, ``seed``, ``repeat``, ``fold``, ``n_train``,
        ``n_test`` and the metrics.
    predictions : DataFrame
        Long table: ``arm``, ``group``, ``seed``, ``repeat``, ``participant``, ``fold``,
        ``y_true``, ``output``.
    folds : list of list of list of str
        Test subjects per fold, per repeat.
    mismatch : list of str
        Settings in which the compared checkpoints differ beyond masking and seed.
    """

    differences: pd.DataFrame
    spread: pd.DataFrame
    scores: pd.DataFrame
    predictions: pd.DataFrame
    folds: list
    mismatch: list = field(default_factory=list)


# -- which checkpoints may be compared -------------------------------------------------------
def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def pretraining_differences(configs: dict) -> list[str]:
    """Pretraining settings in which checkpoints differ, other than masking and seed.

    Parameters
    ----------
    configs : dict
        ``{name: AppConfig}`` of the pretrained checkpoints.

    Returns
    -------
    list of str
        ``"train.steps (a: 100, b: 200)"`` per differing setting, sorted; fine-tuning and
        attribution settings are not pretraining and are ignored.
    """
    flat = {n: _flatten({k: v for k, v in c.to_dict().items()
                         if k not in ("finetune", "attribution")}) for n, c in configs.items()}
    ignore = set(COMPARED_SETTINGS) | set(OPERATIONAL_SETTINGS)
    keys = sorted(set().union(*flat.values()) - ignore)
    out = []
    for key in keys:
        values = {n: f.get(key) for n, f in flat.items()}
        if len({json.dumps(v, default=str) for v in values.values()}) > 1:
            out.append(f"{key} ({', '.join(f'{n}: {v}' for n, v in values.items())})")
    return out


# -- the comparison itself -------------------------------------------------------------
def _binary_accuracy(y, prob) -> float:
    return float(np.mean((np.asarray(prob, float) >= 0.5) == np.asarray(y).astype(bool)))


def _split_differences(scores: pd.DataFrame, metric: str, a: str, b: str) -> Difference:
    by_split = scores.groupby(["group", "repeat", "fold"])[metric].mean()
    paired = pd.concat({"a": by_split.loc[a], "b": by_split.loc[b]}, axis=1).dropna()
    sizes = scores.groupby(["repeat", "fold"])[["n_train", "n_test"]].first().mean()
    return corrected_resampled_ttest((paired["b"] - paired["a"]).to_numpy(),
                                     float(sizes["n_train"]), float(sizes["n_test"]))


def _subject_outputs(predictions: pd.DataFrame, group: str) -> pd.Series:
    """Each subject's out-of-fold P(positive), averaged over repeats and seeds."""
    rows = predictions[predictions["group"] == group]
    return rows.assign(output=rows["output"].astype(float)).groupby("participant")["output"] \
        .mean()


def compare_arms(arms: Sequence[Arm], labels: pd.Series, repeats: Sequence[FoldSplits],
                 task_type: str, *, n_boot: int = 2000, seed: int = 0) -> ComparisonResult:
    """Run every arm on the same repeated folds and compare the groups pairwise.

    Parameters
    ----------
    arms : sequence of Arm
        At least two groups among them; names unique.
    labels : Series
        Label per subject (index: subject), in the order the folds index.
    repeats : sequence of fold lists
        From :func:`~bids_roimae.analysis.evaluation.make_repeated_folds`.
    task_type : {"binary", "multiclass", "regression"}
    n_boot : int
        Bootstrap resamples of the subject-level accuracy difference.
    seed : int
        Seed of the bootstrap.

    Returns
    -------
    ComparisonResult
    """
    names = [a.name for a in arms]
    if len(set(names)) != len(names):
        raise ValueError(f"arm names must be unique: {names}")
    groups = list(dict.fromkeys(a.group for a in arms))
    if len(groups) < 2:
        raise UsageError(f"a comparison needs at least two kinds of model; all arms are "
                         f"{groups[0]!r}")
    subjects = np.asarray(labels.index)
    score_rows, pred_frames = [], []
    for arm in arms:
        for r, folds in enumerate(repeats):
            predictions, table = arm.evaluate(labels, folds)
            for k in range(len(folds)):
                row = table.loc[str(k)].to_dict()
                score_rows.append(dict(arm=arm.name, group=arm.group, seed=arm.seed,
                                       repeat=r, fold=k, **row))
            pred_frames.append(predictions.reset_index(names="participant").assign(
                arm=arm.name, group=arm.group, seed=arm.seed, repeat=r))
        log.info("arm %s: %d repeats x %d folds done", arm.name, len(repeats), len(repeats[0]))
    scores = pd.DataFrame(score_rows)
    predictions = pd.concat(pred_frames, ignore_index=True)
    metrics = list(metric_names(task_type))
    rows = []
    for a, b in itertools.combinations(groups, 2):
        for m in metrics:
            res = _split_differences(scores, m, a, b)
            rows.append(dict(metric=m, model=b, reference=a, **_row(res)))
        if task_type == "binary":
            y = labels.to_numpy().astype(int)
            out_a = _subject_outputs(predictions, a).reindex(subjects).to_numpy()
            out_b = _subject_outputs(predictions, b).reindex(subjects).to_numpy()
            rows.append(dict(metric="roc_auc", model=b, reference=a,
                             **_row(delong_test(y, out_a, out_b))))
            rows.append(dict(metric="accuracy", model=b, reference=a, **_row(paired_bootstrap(
                y, out_a, out_b, _binary_accuracy, n_boot=n_boot, seed=seed))))
    differences = pd.DataFrame(rows)
    return ComparisonResult(
        differences=differences, spread=_spread(scores, metrics, groups), scores=scores,
        predictions=predictions,
        folds=[[[str(subjects[i]) for i in te] for _, te in folds] for folds in repeats])


def _row(res: Difference) -> dict:
    return {"estimate": res.estimate, "ci_low": res.low, "ci_high": res.high, "p": res.p,
            "test": res.method, "n": res.n}


def _spread(scores: pd.DataFrame, metrics: list, groups: list) -> pd.DataFrame:
    rows = []
    for g in groups:
        sub = scores[scores["group"] == g]
        n_seeds = int(sub["arm"].nunique())
        for m in metrics:
            per_split = sub.groupby(["repeat", "fold"])[m].mean()
            per_seed = sub.groupby("arm")[m].mean()
            rows.append({"group": g, "metric": m, "mean": float(per_split.mean()),
                         "sd_between_folds": spread(per_split),
                         "sd_between_seeds": spread(per_seed), "n_seeds": n_seeds,
                         "n_splits": int(per_split.size)})
    return pd.DataFrame(rows)


# -- pretrained checkpoints as arms ----------------------------------------------------------
def compare_masking(models: dict, entries, labels: pd.Series, cfg, out_dir, device="cpu", *,
                    groups: Optional[pd.Series] = None, label_info: Optional[dict] = None,
                    allow_mismatch: bool = False, extra_arms: Sequence[Arm] = ()) -> dict:
    """Fine-tune several pretrained models on the same repeated folds and compare them.

    Parameters
    ----------
    models : dict
        ``{name: pretrained checkpoint path}``. Checkpoints are grouped by their masking
        strategy (each one's seed is a pretraining seed of its group); the groups are
        compared in order of first appearance, ``random`` first when present, so
        differences read ``roi - random``.
        Unless ``cfg.finetune.baseline = "none"``, the built-in baseline is one more arm
        on the same folds, named by its features (``connectome`` or ``region-sd``).
    entries : sequence of CacheEntry
        Prepared runs (the models must share the token geometry of the cache).
    labels : Series
        From :func:`~bids_roimae.analysis.labels.parse_labels`.
    cfg : AppConfig
        ``finetune`` settings (``folds``, ``cv_repeats``, ``strategy``) and ``seed``.
    out_dir : path
        Folder for ``masking_comparison.{tsv,json,png}``, ``masking_spread.tsv``,
        ``masking_scores.tsv`` and ``predictions_<arm>.tsv``.
    groups : Series, optional
        CV group per subject (leave-one-group-out; one repeat).
    allow_mismatch : bool
        Compare checkpoints that differ in more than masking and seed (the outputs list
        the differences) instead of refusing.
    extra_arms : sequence of Arm
        More arms on the same folds (e.g. a connectome baseline).

    Returns
    -------
    dict
        ``table`` (the differences), ``spread``, ``scores``, ``folds``, ``mismatch``,
        ``paths``.

    Raises
    ------
    UsageError
        Fewer than two models; checkpoints that differ in other settings (exit 64).
    """
    if len(models) + len(extra_arms) < 2:
        raise UsageError("compare_masking needs at least two pretrained models")
    out_dir = Path(out_dir)
    loaded = {n: load_model(p, device, kind="pretrain") for n, p in models.items()}
    mismatch = pretraining_differences({n: m.cfg for n, m in loaded.items()})
    if mismatch and not allow_mismatch:
        raise UsageError("the pretrained models differ in more than masking and seed: "
                         + "; ".join(mismatch) + " (--allow-mismatch to compare anyway)")
    run_cfgs = {n: merged_config(loaded[n].cfg, cfg) for n in loaded}
    prepared = {n: prepare_inputs(entries, labels, run_cfgs[n], groups, label_info)
                for n in loaded}
    # The same subjects for every model, so the folds (and the pairing) are identical.
    common = sorted(set.intersection(*(set(p[0].index) for p in prepared.values())))
    first = next(iter(prepared))
    ref_labels, _, ref_groups, info, _ = prepared[first]
    ref_labels = ref_labels.loc[common]
    task = info["task_type"]
    repeats = make_repeated_folds(
        ref_labels.to_numpy(), cfg.finetune.folds, cfg.finetune.cv_repeats, cfg.seed, task,
        None if ref_groups is None else ref_groups.loc[common].to_numpy())
    arms = []
    order = sorted(loaded, key=lambda n: loaded[n].cfg.masking.strategy != "random")
    for n in order:
        check_entries(list(entries), loaded[n].geometry)
        arms.append(_checkpoint_arm(n, loaded[n], prepared[n][1], run_cfgs[n], info, device))
    baseline = cfg.finetune.baseline
    if baseline != "none":
        # The classical arm on the same subjects and folds: does pretraining beat it?
        if baseline in loaded:
            raise UsageError(f"a pretrained model may not be named {baseline!r} in a "
                             "comparison with the built-in baseline")
        arms.append(baseline_arm(entries, loaded[first].geometry, info,
                                 run_cfgs[first]))
    result = compare_arms(arms + list(extra_arms), ref_labels, repeats, task, seed=cfg.seed)
    result.mismatch = mismatch
    meta = dict(info, models={n: str(p) for n, p in models.items()},
                folds=cfg.finetune.folds, repeats=len(repeats), mismatch=mismatch,
                arms={a.name: {"group": a.group, "seed": a.seed} for a in arms})
    paths = _write_comparison(out_dir, result, meta)
    return {"table": result.differences, "spread": result.spread, "scores": result.scores,
            "folds": result.folds, "mismatch": mismatch, "paths": paths}


def _checkpoint_arm(name, loaded, refs, run_cfg, info, device) -> Arm:
    """An arm that fine-tunes one pretrained checkpoint through the configured readout
    (frozen embeddings computed once)."""
    encoder = readout_encoder(loaded, run_cfg.finetune.readout, device)
    emb = None if run_cfg.finetune.strategy == "full" else \
        frozen_embeddings(encoder, refs, run_cfg, device)

    def evaluate(labels, folds):
        return cross_validate(encoder, labels, refs, run_cfg, info, folds, device, emb)

    strategy, seed = loaded.cfg.masking.strategy, int(loaded.cfg.seed)
    return Arm(name=name, group=strategy, evaluate=evaluate, seed=seed)


def baseline_arm(entries, geometry, info: dict, run_cfg) -> Arm:
    """The built-in baseline (``run_cfg.finetune.baseline``) as an arm: region series read
    from the cache once, the features and the probe fitted inside each fold."""
    series = cache_region_series(list(entries), geometry)
    features = run_cfg.finetune.baseline

    def evaluate(labels, folds):
        subset = {s: series[s] for s in map(str, labels.index)}
        return cross_validate_baseline(subset, labels, info, folds, features=features,
                                       kind=run_cfg.finetune.connectivity, seed=run_cfg.seed)

    return Arm(name=features, group=features, evaluate=evaluate)


def checkpoint_label(strategy: str, seed: int, taken: set) -> str:
    """``<strategy>-seed<seed>``, made unique with a counter when taken."""
    label, i = f"{strategy}-seed{seed}", 2
    while label in taken:
        label, i = f"{strategy}-seed{seed}-{i}", i + 1
    return label


def _write_comparison(out_dir: Path, result: ComparisonResult, meta: dict) -> dict:
    paths = {"table": out_dir / "masking_comparison.tsv",
             "spread": out_dir / "masking_spread.tsv",
             "scores": out_dir / "masking_scores.tsv",
             "json": out_dir / "masking_comparison.json",
             "figure": out_dir / "masking_comparison.png"}
    fmt = dict(sep="\t", index=False, na_rep="n/a", float_format="%.6g")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        result.differences.to_csv(paths["table"], **fmt)
        result.spread.to_csv(paths["spread"], **fmt)
        result.scores.to_csv(paths["scores"], **fmt)
        for arm, pred in result.predictions.groupby("arm", sort=False):
            pred.assign(output=[np.asarray(o).tolist() for o in pred["output"]]).to_csv(
                out_dir / f"predictions_{arm}.tsv", **fmt)
        summary = {"meta": meta,
                   "differences": json.loads(result.differences.to_json(orient="records")),
                   "spread": json.loads(result.spread.to_json(orient="records")),
                   "folds": result.folds}
        paths["json"].write_text(json.dumps(summary, indent=2, default=str) + "\n")
        _comparison_figure(paths["figure"], result.scores, meta)
    except OSError as exc:
        raise OutputError(f"cannot write the comparison into {out_dir}: {exc}") from exc
    return paths


def _comparison_figure(path, scores: pd.DataFrame, meta: dict) -> None:
    """One panel per metric: every split's seed-averaged score per group (grey lines join
    the same split), mean ± between-fold SD (black)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    metrics = [m for m in ("accuracy", "roc_auc", "balanced_accuracy", "r2", "mae")
               if m in scores][:3]
    groups = list(dict.fromkeys(scores["group"]))
    fig = Figure(figsize=(2.8 * len(metrics), 3.2), layout="constrained")
    FigureCanvasAgg(fig)
    x = np.arange(len(groups))
    for ax, m in zip(fig.subplots(1, len(metrics), squeeze=False)[0], metrics):
        table = scores.groupby(["group", "repeat", "fold"])[m].mean().unstack("group")[groups]
        for split in table.to_numpy():
            ax.plot(x, split, color="0.75", marker="o", lw=0.8, ms=2)
        ax.errorbar(x, table.mean().to_numpy(), yerr=table.std(ddof=1).to_numpy(),
                    color="black", marker="s", lw=2, capsize=4)
        ax.set_xticks(x, groups)
        ax.set_xlim(-0.5, len(groups) - 0.5)
        ax.set_title(m.replace("_", " "))
    fig.suptitle(f"{meta['repeats']} x {meta['folds']}-fold CV, the same splits for every model")
    fig.savefig(path, dpi=120)
