"""ROI-guided vs random masking: fine-tune both pretrained models on the same folds.

On an output folder of the app (prepared cache + two pretrained models)::

    python benchmarks/compare_masking.py OUTPUT_DIR --bids-dir BIDS_DIR --target DX \\
        --positive 1 2 3 [--models random=PATH roi=PATH] [--finetune linear-probe] \\
        [--folds 5] [--cv-group site] [--seed 0] [--device auto]

Without ``--models`` the pretrained models in ``OUTPUT_DIR/models/`` are paired by their
masking strategy (exactly one ``random`` and one ``roi``; random is the reference, so the
differences read ROI minus random). ``--demo`` instead builds a small synthetic study in a
temporary folder (tokens with a planted region effect, two tiny models pretrained for
``--demo-steps`` steps with each masking) and runs the same comparison on it.

Prints the side-by-side fold table and the paired tests; writes the TSV/JSON/PNG files
of :func:`bids_roimae.training.comparison.compare_masking` under ``--out`` (default
``benchmarks/results/compare_masking/``) and a summary to
``benchmarks/results/compare_masking.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

RESULTS = Path(__file__).parent / "results"


def find_pretrained(output_dir: Path) -> dict:
    """``{"random": path, "roi": path}`` from the models' stored masking strategy."""
    from bids_roimae.io.checkpoint import read_model_info
    from bids_roimae.io.model_store import find_models

    by_strategy: dict[str, list[Path]] = {}
    for path in find_models(output_dir, "pretrain"):
        by_strategy.setdefault(read_model_info(path)[0].masking.strategy, []).append(path)
    if sorted(by_strategy) != ["random", "roi"] or any(len(v) != 1 for v in by_strategy.values()):
        found = {k: [p.parent.name for p in v] for k, v in by_strategy.items()}
        raise SystemExit(f"need exactly one pretrained model per masking strategy in "
                         f"{output_dir / 'models'} (found {found}); pass --models")
    return {"random": by_strategy["random"][0], "roi": by_strategy["roi"][0]}


def make_demo(root: Path, n_subjects: int, steps: int, seed: int, device: str):
    """Synthetic cache + two tiny pretrained models; returns (models, entries, table)."""
    from bids_roimae.config import AppConfig
    from bids_roimae.core.geometry import build_geometry
    from bids_roimae.io.cache import write_entry
    from bids_roimae.training.pretrain import model_name, run_pretraining

    shape = (23, 27, 21)
    ijk = np.indices(shape).transpose(1, 2, 3, 0)
    centre = (np.array(shape) - 1) / 2
    mask = (((ijk - centre) / (centre * 0.9)) ** 2).sum(-1) <= 1
    # eight "regions": octants of the ellipsoid
    labels = np.where(mask, 1 + (ijk[..., 0] > centre[0]) + 2 * (ijk[..., 1] > centre[1])
                      + 4 * (ijk[..., 2] > centre[2]), 0)
    geometry = build_geometry(mask, np.diag([2.0, 2.0, 2.0, 1.0]), labels, 4)
    rng = np.random.default_rng(seed)
    entries, rows = [], []
    region = geometry.patch_label == 1
    for i in range(n_subjects):
        subject, case = f"{i:03d}", i % 2
        tokens = rng.normal(size=(40, geometry.n_tokens, geometry.patch_voxels))
        # cases: region 1 shares one slow fluctuation (a connectivity-like effect)
        shared = np.convolve(rng.normal(size=48), np.ones(8) / 8, "valid")[:40]
        tokens[:, region, :] += 1.5 * case * shared[:, None, None]
        tokens = (tokens * geometry.voxel_mask).astype(np.float32)
        key = f"sub-{subject}_task-rest"
        entries.append(write_entry(
            root / "cache" / f"sub-{subject}" / f"{key}_demo.npy", tokens.shape, np.float16,
            lambda a, t=tokens: a.__setitem__(Ellipsis, t),
            {"subject": subject, "run_key": key}))
        rows.append({"participant_id": f"sub-{subject}", "DX": str(case)})
    models = {}
    for strategy in ("random", "roi"):
        cfg = AppConfig()
        cfg.geometry.patch_size, cfg.geometry.window, cfg.geometry.temporal_patch = 4, 20, 4
        cfg.masking.strategy, cfg.train.steps, cfg.train.batch_size = strategy, steps, 8
        cfg.train.warmup_steps, cfg.train.checkpoint_every = max(1, steps // 10), steps
        cfg.train.lr, cfg.seed = 1e-3, seed
        models[strategy] = run_pretraining(entries, geometry, cfg,
                                           root / "models" / model_name(cfg),
                                           device=device, resume=False)
    table = pd.DataFrame(rows)
    table.index = pd.Index(table["participant_id"].str[4:], name="participant")
    return models, entries, table


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("output_dir", nargs="?", type=Path)
    parser.add_argument("--bids-dir", type=Path, help="dataset holding participants.tsv")
    parser.add_argument("--target", default="DX")
    parser.add_argument("--positive", nargs="*", default=None)
    parser.add_argument("--task-type", default="binary",
                        choices=["binary", "multiclass", "regression"])
    parser.add_argument("--models", nargs="*", default=None, metavar="NAME=PATH")
    parser.add_argument("--finetune", default="linear-probe",
                        choices=["linear-probe", "head", "full"])
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--cv-group", default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, default=RESULTS / "compare_masking")
    parser.add_argument("--demo", action="store_true")
    parser.add_argument("--demo-subjects", type=int, default=40)
    parser.add_argument("--demo-steps", type=int, default=60)
    args = parser.parse_args(argv)

    import torch

    from bids_roimae.analysis.labels import parse_groups, parse_labels
    from bids_roimae.config import AppConfig
    from bids_roimae.io.cache import load_entries
    from bids_roimae.io.checkpoint import read_model_info
    from bids_roimae.training.comparison import compare_masking

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" \
        else args.device
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        if args.demo:
            models, entries, participants = make_demo(Path(scratch), args.demo_subjects,
                                                      args.demo_steps, args.seed, device)
        else:
            if args.output_dir is None or args.bids_dir is None:
                parser.error("OUTPUT_DIR and --bids-dir are required without --demo")
            from bids_roimae.io.discovery import read_participants

            models = dict(m.split("=", 1) for m in args.models) if args.models \
                else find_pretrained(args.output_dir)
            geometry = read_model_info(next(iter(models.values())))[1]
            entries = load_entries(args.output_dir, geometry)
            participants = read_participants(args.bids_dir)
        pretrain_s = time.perf_counter() - started
        labels, info = parse_labels(participants, args.target, args.positive, args.task_type)
        groups = parse_groups(participants, args.cv_group)[0] if args.cv_group else None
        cfg = AppConfig()
        cfg.finetune.strategy, cfg.finetune.folds = args.finetune, args.folds
        cfg.finetune.task_type, cfg.seed = args.task_type, args.seed
        t0 = time.perf_counter()
        out = compare_masking(models, entries, labels, cfg, args.out, device, groups=groups)
        compare_s = time.perf_counter() - t0

    pd.set_option("display.width", 160)
    print(out["table"].round(4).to_string(index=False))
    print()
    print(out["spread"].round(4).to_string(index=False))
    summary = {
        "benchmark": "compare_masking", "demo": bool(args.demo), "device": device,
        "torch": torch.__version__, "python": platform.python_version(),
        "target": info["target"], "n_subjects": int(labels.size),
        "strategy": args.finetune, "folds": len(out["folds"][0]), "repeats": len(out["folds"]),
        "seconds_setup": round(pretrain_s, 1), "seconds_compare": round(compare_s, 1),
        "models": {k: str(v) for k, v in models.items()},
        "table": json.loads(out["table"].to_json(orient="records")),
        "spread": json.loads(out["spread"].to_json(orient="records")),
        "files": {k: str(v) for k, v in out["paths"].items()},
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "compare_masking.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\nsetup {pretrain_s:.1f} s, comparison {compare_s:.1f} s on {device}; "
          f"wrote {RESULTS / 'compare_masking.json'} and {args.out}/")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
