"""Time and peak memory of ``participant --mode predict``, one subject per process.

Builds (or reuses, in ``--workdir``) a small study on the template's 2 mm grid with the
app itself: ``bids_roimae-synth`` (``--subjects`` x ``--frames``), ``participant --mode
prepare``, ``group --mode pretrain`` (tiny preset, a few steps) and ``participant --mode
finetune`` (linear probe). Then runs ``participant --mode predict`` as a child process

* per subject for ``--measure`` subjects: Integrated Gradients only (``--no-fidelity``),
  and IG with region fidelity on ``--fidelity-windows`` windows;
* on an unseen one-subject dataset with one ``--long-frames`` run (97x115x97x400 by
  default), with the fine-tuned model (``--model``), IG only;

and reports each one's wall time and peak resident memory (``ru_maxrss``); target: under
4 GB on CPU. Template and atlas come from the user's TemplateFlow and nilearn caches (see
``harness.py``), else synthetic ones on the same grid.

Usage: python benchmarks/bench_predict.py [--subjects 6] [--frames 60] [--measure 2]
    [--long-frames 400] [--fidelity-windows 1] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from bench_prepare import write_dataset
from harness import app_env, machine, model_grid, run_child, write_result

RSS_TARGET_MB = 4096
APP = [sys.executable, "-m", "bids_roimae.cli"]


def app(env: dict, *args) -> None:
    """Run one app step (set-up, not measured); stop with its output on failure."""
    done = run_child([*APP, *map(str, args)], env=env)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, args[2:5]))} failed ({done.returncode}):\n"
                         f"{done.output_tail}")


def build_study(root: Path, env: dict, subjects: int, frames: int, threads: int) -> Path:
    """Synthetic dataset, its cache, a pretrained and a fine-tuned model; the model path."""
    data, out = root / "data", root / "out"
    common = ["--model-preset", "tiny", "-w", root / "work", "--nprocs", threads,
              "--skip-bids-validation"]
    if not (data / "participants.tsv").is_file():
        synth = "import sys; from bids_roimae.synth.dataset import main; main(sys.argv[1:])"
        done = run_child([sys.executable, "-c", synth, data, "--n-subjects", subjects,
                          "--n-frames", frames], env=env)
        if done.returncode != 0:
            raise SystemExit(f"bids_roimae-synth failed:\n{done.output_tail}")
    finetuned = sorted((out / "models").glob("*_ft-*/model.pt")) if out.is_dir() else []
    if finetuned:
        return finetuned[0]
    app(env, data, out, "participant", "--mode", "prepare", *common)
    app(env, data, out, "group", "--mode", "pretrain", "--masking", "roi", "--steps", 4,
        "--batch-size", 2, *common)
    pretrained = next((out / "models").glob("*/model.pt"))
    app(env, data, out, "participant", "--mode", "finetune", "--target", "dx", "--positive",
        1, 2, 3, "--folds", 2, "--pretrained", pretrained, *common)
    return next((out / "models").glob("*_ft-*/model.pt"))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", type=int, default=6)
    parser.add_argument("--frames", type=int, default=60)
    parser.add_argument("--measure", type=int, default=2, help="subjects measured")
    parser.add_argument("--long-frames", type=int, default=400,
                        help="frames of the unseen long run (0: skip it)")
    parser.add_argument("--fidelity-windows", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2, help="--nprocs of the set-up")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="folder for the study (kept; reused)")
    args = parser.parse_args(argv)
    root = (args.workdir or Path(tempfile.gettempdir()) / "bids_roimae_bench_predict"
            ).absolute()
    grid = model_grid(with_atlas=True)
    env = app_env(root, grid)
    model = build_study(root, env, args.subjects, args.frames, args.threads)
    data, out = root / "data", root / "out"
    labels = sorted(p.name[4:] for p in data.glob("sub-*") if p.is_dir())[:args.measure]
    cases = []
    for label in labels:
        for what, extra in (("IG", ["--no-fidelity"]),
                            (f"IG + fidelity ({args.fidelity_windows} window)",
                             ["--fidelity-windows", str(args.fidelity_windows)])):
            cases.append((f"sub-{label} ({args.frames} frames), {what}",
                          [*APP, data, out, "participant", "--mode", "predict",
                           "--participant-label", label, "--skip-bids-validation",
                           "-w", root / "work", *extra]))
    if args.long_frames:
        long_bids, _ = write_dataset(root / f"long-{args.long_frames}", grid.mask, grid.affine,
                                     args.long_frames)
        cases.append((f"unseen sub-01 ({args.long_frames} frames), IG",
                      [*APP, long_bids.parents[2], root / f"long-out-{args.long_frames}",
                       "participant", "--mode", "predict", "--model", model, "--no-fidelity",
                       "--skip-bids-validation", "-w", root / "work-long"]))
    rows = []
    for name, argv_case in cases:
        measured = run_child(argv_case, env=env)
        if measured.returncode != 0:
            raise SystemExit(f"{name} failed ({measured.returncode}):\n{measured.output_tail}")
        rows.append({"case": name, "seconds": round(measured.seconds, 1),
                     "peak_rss_mb": round(measured.peak_rss_mb, 1)})
    print(f"model {model.parent.name}; grid {grid.mask_source}; atlas {grid.labels_source}")
    print(f"{'participant --mode predict':<48}{'seconds':>9}{'peak RSS MB':>13}")
    for row in rows:
        print(f"{row['case']:<48}{row['seconds']:>9.1f}{row['peak_rss_mb']:>13,.0f}")
    worst = max(r["peak_rss_mb"] for r in rows)
    print(f"largest peak {worst:,.0f} MB (target < {RSS_TARGET_MB:,} MB)")
    result = {"subjects": args.subjects, "frames": args.frames, "model": str(model),
              "mask": grid.mask_source, "atlas": grid.labels_source, "cases": rows,
              "max_peak_rss_mb": worst, "rss_target_mb": RSS_TARGET_MB, **machine()}
    write_result("bench_predict", result)
    return result


if __name__ == "__main__":
    main()
