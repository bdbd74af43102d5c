"""Does the foundation model carry what a connectome finds? Baseline vs model, one table.

For each effect size and seed, a generated dataset (``bids_roimae-synth``: ADHD-like
larger fluctuation and weaker network coupling in the planted regions) goes through the
app's own CLI exactly as a user runs it::

    participant --mode prepare
    group --mode pretrain --masking roi / random        (per patch size)
    participant --mode finetune --compare-masking --readout R   (per readout; the
        connectome baseline runs on the same folds inside every comparison)
    [--attribution: participant --mode predict, group --mode report -> planted ranks]

and prints one table: accuracy and ROC AUC, mean ± SD over folds and repeats (datasets),
for the baseline and for each (masking, readout, patch size) arm; with
``--attribution`` also where the planted regions rank in the group attribution
(group difference of mean |IG|) and fidelity tables.

Usage (CPU; needs the real template and AAL3 in the TemplateFlow/nilearn caches, e.g.
laid out from ../shared/data as scripts/demo.sh does)::

    python benchmarks/science.py --out /tmp/science --effect-sizes 0.5 0.3 --seeds 0 1 \\
        --steps 150 --readouts region-sd region region-cov mean --patch-sizes 6 [--attribution] \\
        [--config SETTINGS.toml]

Writes ``OUT/science.tsv`` (one row per arm, dataset and fold) and ``OUT/science.json``
(the printed summary, settings, timings).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd


def run_cli(args: list[str]) -> None:
    from bids_roimae.cli import main

    code = main([str(a) for a in args])
    if code != 0:
        raise SystemExit(f"bids_roimae {' '.join(map(str, args))} exited with {code}")


def planted_ranks(out: Path, planted: list[str]) -> dict:
    """Ranks of the planted regions in the group attribution and fidelity tables."""
    ranks = {}
    for label, pattern in (("ig", "*stat-ig_desc-groupdiff_stats.tsv"),
                           ("fidelity", "*stat-fidelity*groupdiff_stats.tsv")):
        files = sorted((out / "group").glob(pattern))
        if not files:
            continue
        table = pd.read_csv(files[0], sep="\t")
        order = table.sort_values("p").reset_index(drop=True) if "p" in table else table
        names = list(order["name"])
        ranks[label] = {p: (names.index(p) + 1 if p in names else None) for p in planted}
        ranks[f"{label}_n_regions"] = len(names)
    return ranks


def region_sd_rows(pout: Path, seed: int) -> list[dict]:
    """The app's ``--baseline region-sd`` (the built-in baseline's region SDs without its
    correlations) on the folds of the last comparison: is the built-in baseline diluted?
    One dict per (repeat, fold) with accuracy and ROC AUC."""
    from bids_roimae.io.cache import load_entries
    from bids_roimae.io.checkpoint import geometry_from_checkpoint, load_checkpoint
    from bids_roimae.training.baseline import cache_region_series, cross_validate_baseline

    checkpoint = next((pout / "models").glob("roimae_mask-roi_*/model.pt"))
    geometry = geometry_from_checkpoint(load_checkpoint(checkpoint))
    series = cache_region_series(load_entries(pout, geometry), geometry)
    folds = pd.read_csv(pout / "models" / "masking_comparison" / "predictions_connectome.tsv",
                        sep="\t", dtype={"participant": str})
    subjects = sorted(set(folds["participant"]))
    labels = folds.drop_duplicates("participant").set_index("participant").loc[
        subjects, "y_true"]
    rows = []
    for repeat, split in folds.groupby("repeat"):
        fold_of = split.set_index("participant").loc[subjects, "fold"].to_numpy()
        splits = [(np.flatnonzero(fold_of != k), np.flatnonzero(fold_of == k))
                  for k in np.unique(fold_of)]
        _, table = cross_validate_baseline(series, labels, {"task_type": "binary"}, splits,
                                           features="region-sd", seed=seed)
        rows += [{"fold": f"{repeat}.{fold}", "accuracy": float(r["accuracy"]),
                  "roc_auc": float(r["roc_auc"])}
                 for fold, r in table.drop(index=["mean", "sd"]).iterrows()]
    return rows


def one_dataset(root: Path, effect_size: float, seed: int, opts) -> tuple[list[dict], dict]:
    """Generate, prepare, pretrain both maskings, compare every readout; fold rows."""
    from bids_roimae.synth.dataset import make_dataset

    data, out = root / "data", root / "out"
    t0 = time.perf_counter()
    if not (data / "participants.tsv").is_file():
        make_dataset(data, n_subjects=opts.n_subjects, n_frames=opts.n_frames, seed=seed,
                     effect_size=effect_size, effect=opts.effect, n_jobs=2,
                     planted_regions=opts.planted or None)
    manifest = json.loads((data / "code" / "synth_manifest.json").read_text())
    timings = {"generate": time.perf_counter() - t0}
    common = ["-w", root / "work", "--skip-bids-validation", "--seed", seed,
              "--device", "cpu", "--nprocs", 2]
    if opts.config:
        common += ["--config", opts.config]
    rows = []
    for patch in opts.patch_sizes:
        pout = out / f"ps-{patch}"
        geometry = ["--patch-size", patch]
        if opts.window:
            geometry += ["--window", opts.window]
        if opts.temporal_patch:
            geometry += ["--temporal-patch", opts.temporal_patch]
        t0 = time.perf_counter()
        run_cli([data, pout, "participant", "--mode", "prepare", *geometry, *common])
        timings[f"prepare_ps{patch}"] = time.perf_counter() - t0
        for masking in opts.maskings:
            t0 = time.perf_counter()
            run_cli([data, pout, "group", "--mode", "pretrain", "--masking", masking,
                     "--steps", opts.steps, "--batch-size", opts.batch_size,
                     "--model-preset", opts.preset, *geometry, *common])
            timings[f"pretrain_{masking}_ps{patch}"] = time.perf_counter() - t0
            summary = json.loads(next((pout / "models").glob(
                f"roimae_mask-{masking}_*/summary.json")).read_text())
            timings[f"skill_{masking}_ps{patch}"] = summary.get("final_val_skill")
        for readout in opts.readouts:
            t0 = time.perf_counter()
            run_cli([data, pout, "participant", "--mode", "finetune", "--target", "dx",
                     "--positive", "1", "2", "3", "--folds", opts.folds, "--compare-masking",
                     "--readout", readout, *geometry, *common])
            timings[f"finetune_{readout}_ps{patch}"] = time.perf_counter() - t0
            # One row per arm, repeat and fold: the same splits for every arm.
            scores = pd.read_csv(pout / "models" / "masking_comparison" /
                                 "masking_scores.tsv", sep="\t")
            for _, fold in scores.iterrows():
                is_base = fold["group"] == "connectome"
                if is_base and (readout != opts.readouts[0] or patch != opts.patch_sizes[0]):
                    continue  # one baseline per dataset: it depends on neither
                rows.append({"effect_size": effect_size, "seed": seed,
                             "arm": "connectome baseline" if is_base
                             else f"{fold['group']} masking, {readout} readout, ps {patch}",
                             "fold": f"{fold['repeat']}.{fold['fold']}",
                             "accuracy": fold["accuracy"], "roc_auc": fold["roc_auc"]})
        if patch == opts.patch_sizes[0]:
            rows += [dict(row, effect_size=effect_size, seed=seed,
                          arm="region SD alone (logistic regression)")
                     for row in region_sd_rows(pout, seed)]
        if opts.attribution:
            t0 = time.perf_counter()
            roi = next((pout / "models").glob("roimae_mask-roi_*/model.pt"))
            run_cli([data, pout, "participant", "--mode", "finetune", "--target", "dx",
                     "--positive", "1", "2", "3", "--folds", opts.folds, "--pretrained", roi,
                     "--readout", opts.readouts[0], *geometry, *common])
            run_cli([data, pout, "participant", "--mode", "predict", "--ig-steps", 8,
                     "--fidelity-windows", 1, *geometry, *common])
            run_cli([data, pout, "group", "--mode", "report", *geometry, *common])
            timings[f"attribution_ps{patch}"] = time.perf_counter() - t0
            timings[f"ranks_ps{patch}"] = planted_ranks(
                pout, [p["name"] for p in manifest["planted_regions"]])
    return rows, timings


def summarise(rows: pd.DataFrame) -> pd.DataFrame:
    """Mean ± SD over folds and repeats per effect size and arm."""
    out = []
    for (effect, arm), group in rows.groupby(["effect_size", "arm"], sort=False):
        out.append({"effect_size": effect, "arm": arm,
                    "accuracy": f"{group['accuracy'].mean():.3f} ± {group['accuracy'].std():.3f}",
                    "roc_auc": f"{group['roc_auc'].mean():.3f} ± {group['roc_auc'].std():.3f}",
                    "n_folds": len(group)})
    return pd.DataFrame(out)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--effect-sizes", type=float, nargs="+", default=[0.5])
    parser.add_argument("--effect", default="both", choices=["both", "amplitude", "coupling"])
    parser.add_argument("--planted", nargs="*", default=[])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--n-subjects", type=int, default=24)
    parser.add_argument("--n-frames", type=int, default=80)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--maskings", nargs="+", default=["roi", "random"])
    parser.add_argument("--readouts", nargs="+",
                        default=["region-sd", "region", "region-cov", "mean"],
                        help="The first also serves --attribution.")
    parser.add_argument("--patch-sizes", type=int, nargs="+", default=[6])
    parser.add_argument("--attribution", action="store_true",
                        help="Also predict (IG + fidelity) and report: planted-region ranks.")
    parser.add_argument("--grid", type=int, nargs=3, default=None, metavar=("X", "Y", "Z"),
                        help="A synthetic template and 29-region AAL3-like atlas on this "
                             "grid instead of the real ones in the caches (CPU-sized runs).")
    parser.add_argument("--window", type=int, default=None)
    parser.add_argument("--temporal-patch", type=int, default=None)
    parser.add_argument("--config", type=Path, default=None,
                        help="An app settings TOML passed to every command (e.g. [train] lr, "
                             "warmup_steps).")
    opts = parser.parse_args(argv)
    logging.getLogger("bids_roimae").setLevel(logging.WARNING)
    if opts.grid:
        import os

        from bids_roimae.synth.resources import write_synthetic_resources

        res = opts.out / "resources"
        write_synthetic_resources(res / "templateflow", res / "nilearn_data",
                                  shape=tuple(opts.grid))
        os.environ.update(TEMPLATEFLOW_HOME=str(res / "templateflow"),
                          NILEARN_DATA=str(res / "nilearn_data"), TEMPLATEFLOW_AUTOUPDATE="0")
    start = time.perf_counter()
    rows, timings = [], {}
    for effect in opts.effect_sizes:
        for seed in opts.seeds:
            name = f"effect-{effect:g}_seed-{seed}"
            got, timings[name] = one_dataset(opts.out / name, effect, seed, opts)
            rows += got
            print(f"{name}: done after {time.perf_counter() - start:.0f} s", flush=True)
    table = pd.DataFrame(rows)
    opts.out.mkdir(parents=True, exist_ok=True)
    table.to_csv(opts.out / "science.tsv", sep="\t", index=False)
    summary = summarise(table)
    with pd.option_context("display.width", 160, "display.max_colwidth", 60):
        print(summary.to_string(index=False))
    for name, t in timings.items():
        ranks = {k: v for k, v in t.items() if k.startswith(("ranks", "skill"))}
        if ranks:
            print(name, json.dumps(ranks))
    seconds = time.perf_counter() - start
    print(f"total {seconds:.0f} s")
    (opts.out / "science.json").write_text(json.dumps({
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(opts).items()},
        "summary": summary.to_dict("records"), "timings": timings,
        "seconds": seconds}, indent=2, default=float))


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
