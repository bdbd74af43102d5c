"""Paired comparison of pretrained models fine-tuned on the same folds.

The question it answers: does ROI-guided masking pretrain a better encoder than random
masking? Both models are fine-tuned with the same strategy on the **same** subject folds,
so each fold gives a paired difference; the differences are summarised (mean ± SD) and
tested across folds with a paired t-test and the Wilcoxon signed-rank test (where
defined: at least two folds, not all differences zero). With few folds these tests have
little power; the per-fold table is the primary result.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd

from bids_roimae.analysis.evaluation import make_folds, mean_sd, metric_names
from bids_roimae.errors import OutputError, UsageError
from bids_roimae.io.checkpoint import load_model
from bids_roimae.model.readout import build_readout
from bids_roimae.training.baseline import BASELINE_NAME
from bids_roimae.training.cross_validation import cross_validate, prepare_inputs
from bids_roimae.training.finetune import check_entries, merged_config, run_baseline


def compare_masking(models: dict, entries, labels: pd.Series, cfg, out_dir, device="cpu", *,
                    groups: Optional[pd.Series] = None, label_info: Optional[dict] = None
                    ) -> dict:
    """Fine-tune several pretrained models on the same folds and compare them pairwise.

    Parameters
    ----------
    models : dict
        ``{name: pretrained checkpoint path}``; the first is the reference that the
        others are compared with (e.g. ``{"random": ..., "roi": ...}``). With
        ``cfg.finetune.baseline = "connectome"`` the built-in connectome baseline is one
        more arm (named ``connectome``, last) on the same folds.
    entries : sequence of CacheEntry
        Prepared runs (the models must share the token geometry of the cache).
    labels : Series
        From :func:`~bids_roimae.analysis.labels.parse_labels`.
    cfg : AppConfig
        ``finetune`` settings and ``seed`` (architecture comes from each checkpoint).
    out_dir : path
        Folder for ``masking_comparison.{tsv,json,png}``, ``masking_tests.tsv`` and
        ``predictions_<name>.tsv``.
    groups : Series, optional
        CV group per subject (leave-one-group-out).

    Returns
    -------
    dict
        ``table`` (side by side: ``<metric>_<name>`` per fold plus mean/sd rows and
        ``<metric>_diff_<name>`` paired differences), ``tests`` (paired t-test and
        Wilcoxon per metric), ``folds`` (test subjects per fold), ``paths``.
    """
    from scipy import stats

    if len(models) < 2:
        raise UsageError("compare_masking needs at least two pretrained models")
    out_dir = Path(out_dir)
    names = list(models)
    loaded = {n: load_model(p, device, kind="pretrain") for n, p in models.items()}
    run_cfgs = {n: merged_config(loaded[n].cfg, cfg) for n in names}
    prepared = {n: prepare_inputs(entries, labels, run_cfgs[n], groups, label_info)
                for n in names}
    # The same subjects for every model, so the folds (and the pairing) are identical.
    common = sorted(set.intersection(*(set(p[0].index) for p in prepared.values())))
    ref_labels, _, ref_groups, info, _ = prepared[names[0]]
    ref_labels = ref_labels.loc[common]
    task = info["task_type"]
    folds = make_folds(ref_labels.to_numpy(), cfg.finetune.folds, cfg.seed, task,
                       None if ref_groups is None else ref_groups.loc[common].to_numpy())
    per_model, tables = {}, {}
    for n in names:
        geometry = loaded[n].geometry
        check_entries(list(entries), geometry)
        encoder = build_readout(loaded[n].model, run_cfgs[n].finetune.readout, geometry)
        refs = prepared[n][1]
        per_model[n], tables[n] = cross_validate(encoder.to(device), ref_labels, refs,
                                                 run_cfgs[n], info, folds, device)
    if cfg.finetune.baseline == "connectome":
        # The classical arm on the same subjects and folds: does pretraining beat it?
        if BASELINE_NAME in names:
            raise UsageError(f"a pretrained model may not be named {BASELINE_NAME!r} in a "
                             "comparison with the built-in baseline")
        per_model[BASELINE_NAME], tables[BASELINE_NAME] = run_baseline(
            entries, loaded[names[0]].geometry, ref_labels, info, folds, run_cfgs[names[0]])
        names.append(BASELINE_NAME)
    metrics = list(metric_names(task))
    side = pd.concat({n: tables[n][metrics] for n in names}, axis=1)
    side.columns = [f"{m}_{n}" for n, m in side.columns]
    rows, ref = [], names[0]
    n_folds = len(folds)
    for other in names[1:]:
        for m in metrics:
            a = tables[ref][m].iloc[:n_folds].to_numpy(float)
            b = tables[other][m].iloc[:n_folds].to_numpy(float)
            diff = b - a
            side.loc[side.index[:n_folds], f"{m}_diff_{other}"] = diff
            side.loc["mean", f"{m}_diff_{other}"] = np.nanmean(diff)
            side.loc["sd", f"{m}_diff_{other}"] = np.nanstd(diff, ddof=1)
            rows.append(dict(metric=m, model=other, reference=ref, n_folds=n_folds,
                             mean_difference=float(np.nanmean(diff)),
                             **_paired_tests(stats, a, b)))
    tests = pd.DataFrame(rows)
    paths = _write_comparison(out_dir, side, tests, per_model, names, metrics, tables,
                              n_folds, dict(info, models={n: str(p) for n, p in models.items()}))
    return {"table": side, "tests": tests, "paths": paths,
            "folds": [[str(ref_labels.index[i]) for i in te] for _, te in folds]}


def _paired_tests(stats, a: np.ndarray, b: np.ndarray) -> dict:
    """Paired t-test and Wilcoxon signed-rank over folds (NaN where undefined)."""
    keep = ~(np.isnan(a) | np.isnan(b))
    a, b = a[keep], b[keep]
    out = {"t": np.nan, "t_pvalue": np.nan, "wilcoxon": np.nan, "wilcoxon_pvalue": np.nan}
    if a.size >= 2 and np.std(b - a) > 0:
        res = stats.ttest_rel(b, a)
        out.update(t=float(res.statistic), t_pvalue=float(res.pvalue))
    if a.size >= 2 and np.any(b - a != 0):
        res = stats.wilcoxon(b, a)
        out.update(wilcoxon=float(res.statistic), wilcoxon_pvalue=float(res.pvalue))
    return out


def _write_comparison(out_dir, side, tests, per_model, names, metrics, tables, n_folds,
                      meta) -> dict:
    paths = {"table": out_dir / "masking_comparison.tsv",
             "tests": out_dir / "masking_tests.tsv",
             "json": out_dir / "masking_comparison.json",
             "figure": out_dir / "masking_comparison.png"}
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        side.reset_index().to_csv(paths["table"], sep="\t", index=False, na_rep="n/a",
                                  float_format="%.6g")
        tests.to_csv(paths["tests"], sep="\t", index=False, na_rep="n/a", float_format="%.6g")
        for n, pred in per_model.items():
            pred.assign(output=[np.asarray(o).tolist() for o in pred["output"]]).to_csv(
                out_dir / f"predictions_{n}.tsv", sep="\t", na_rep="n/a")
        summary = {"meta": meta, "metrics": {n: mean_sd(tables[n]) for n in names},
                   "tests": json.loads(tests.to_json(orient="records"))}
        paths["json"].write_text(json.dumps(summary, indent=2, default=str) + "\n")
        _comparison_figure(paths["figure"], tables, names, metrics, n_folds)
    except OSError as exc:
        raise OutputError(f"cannot write the comparison into {out_dir}: {exc}") from exc
    return paths


def _comparison_figure(path, tables, names, metrics, n_folds) -> None:
    """One panel per metric: each fold's paired values (grey lines), mean ± SD (black)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(2.6 * len(metrics), 3.2), layout="constrained")
    FigureCanvasAgg(fig)
    x = np.arange(len(names))
    for ax, m in zip(fig.subplots(1, len(metrics), squeeze=False)[0], metrics):
        values = np.array([tables[n][m].iloc[:n_folds].to_numpy(float) for n in names])
        for fold in values.T:
            ax.plot(x, fold, color="0.7", marker="o", lw=1, ms=3)
        ax.errorbar(x, np.nanmean(values, axis=1), yerr=np.nanstd(values, axis=1, ddof=1),
                    color="black", marker="s", lw=2, capsize=4)
        ax.set_xticks(x, names)
        ax.set_xlim(-0.5, len(names) - 0.5)
        ax.set_title(m.replace("_", " "))
    fig.suptitle(f"Fine-tuning on the same {n_folds} folds")
    fig.savefig(path, dpi=120)
