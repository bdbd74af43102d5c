"""Time one participant's Integrated Gradients (and optionally region fidelity) on CPU.

Real geometry size by default: 1,486 tokens x 216 voxels (MNI152NLin2009cAsym 2 mm,
patch 6), window 20, temporal patch 4, the ``tiny`` preset, 8 windows, 32 steps.

    python benchmarks/bench_attribution.py [--windows 8] [--steps 32] [--batch-size 16]
        [--min-steps 8] [--threads 2] [--fidelity-regions 0]

Prints a table and writes ``benchmarks/results/bench_attribution.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn


def build(n_tokens: int, patch_voxels: int, window: int, temporal_patch: int, preset: str):
    from bids_roimae.config import ModelConfig
    from bids_roimae.model.classifier import Classifier
    from bids_roimae.model.mae import RoiMAE, resolve_model_config

    side = int(np.ceil(n_tokens ** (1 / 3)))
    ijk = np.stack(np.unravel_index(np.arange(n_tokens), (side, side, side)), axis=1)
    centres = ijk * 12.0 - 80.0
    voxel_mask = np.ones((n_tokens, patch_voxels), bool)
    sizes = resolve_model_config(ModelConfig(preset=preset))
    mae = RoiMAE(centres, voxel_mask, temporal_patch, window // temporal_patch, **sizes)
    head = nn.Linear(sizes["embed_dim"], 1)
    return mae, Classifier(mae, head, sizes["embed_dim"])


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=1486)
    ap.add_argument("--patch-voxels", type=int, default=216)
    ap.add_argument("--window", type=int, default=20)
    ap.add_argument("--temporal-patch", type=int, default=4)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--min-steps", type=int, default=None,
                    help="adaptive integration: start with this many points")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--fidelity-regions", type=int, default=0,
                    help="also time region fidelity over this many synthetic regions")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"
                                         / "bench_attribution.json"))
    args = ap.parse_args(argv)

    from bids_roimae.analysis.attribution import integrated_gradients
    from bids_roimae.analysis.fidelity import region_fidelity

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    mae, classifier = build(args.tokens, args.patch_voxels, args.window,
                            args.temporal_patch, args.preset)
    windows = torch.randn(args.windows, args.window, args.tokens, args.patch_voxels)
    t0, c0 = time.perf_counter(), time.process_time()
    result = integrated_gradients(classifier, windows, steps=args.steps,
                                  batch_size=args.batch_size, min_steps=args.min_steps)
    ig_s, ig_cpu = time.perf_counter() - t0, time.process_time() - c0
    rows = [("integrated_gradients", ig_s, args.windows * result.steps / ig_s,
             f"{ig_cpu:.0f} CPU-s; {result.steps} steps used, max rel. completeness error "
             f"{result.max_relative_error:.2e}")]
    record = {
        "machine": platform.processor() or platform.machine(), "threads": args.threads,
        "torch": torch.__version__, "tokens": args.tokens, "patch_voxels": args.patch_voxels,
        "window": args.window, "temporal_patch": args.temporal_patch, "preset": args.preset,
        "windows": args.windows, "steps": args.steps, "min_steps": args.min_steps,
        "steps_used": result.steps, "batch_size": args.batch_size,
        "ig_seconds": ig_s, "ig_cpu_seconds": ig_cpu,
        "load_average": list(__import__("os").getloadavg()),
        "ig_window_steps_per_s": args.windows * result.steps / ig_s,
        "ig_max_relative_error": result.max_relative_error,
    }
    if args.fidelity_regions:
        from bids_roimae.core.geometry import TokenGeometry

        # A stand-in geometry object: only region_patches() is read by region_fidelity.
        class _Regions:
            def __init__(self, n_tok, n_reg):
                split = np.array_split(np.arange(n_tok), n_reg)
                self._groups = {i + 1: g for i, g in enumerate(split)}

            def region_patches(self):
                return self._groups

        geometry = _Regions(args.tokens, args.fidelity_regions)
        assert not isinstance(geometry, TokenGeometry)
        t0 = time.perf_counter()
        region_fidelity(mae, windows, geometry, batch_size=args.batch_size)
        fid_s = time.perf_counter() - t0
        n_pairs = args.windows * args.fidelity_regions
        rows.append(("region_fidelity", fid_s, n_pairs / fid_s,
                     f"{args.fidelity_regions} regions x {args.windows} windows"))
        record.update(fidelity_regions=args.fidelity_regions, fidelity_seconds=fid_s,
                      fidelity_pairs_per_s=n_pairs / fid_s)

    print(f"{'stage':<22} {'seconds':>9} {'items/s':>9}  note")
    for name, secs, rate, note in rows:
        print(f"{name:<22} {secs:>9.2f} {rate:>9.1f}  {note}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2))
    print(f"wrote {out}")
    return record


if __name__ == "__main__":
    main()
