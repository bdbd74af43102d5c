"""Window read throughput from the token cache (page cache warm).

Prepares a few full-size runs (97x115x97 MNI152NLin2009cAsym 2 mm grid, patch 6, stored
uncompressed so setting up is quick) into cache entries, then reads random 20-frame windows
from them through ``CacheEntry.tokens()`` memory maps into a preallocated numpy batch
``(B, W, N, P)``: once as float16 (what a GPU loader pins and copies), and converted to float32
(what a CPU loader feeds the model) by ``np.copyto`` and by ``CacheEntry.window``.
Throughput counts the cache bytes read (float16).

Target: >= 1 GB/s.

Usage: python benchmarks/bench_cache_read.py [--runs 4] [--frames 120] [--batches 40]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from harness import RESULTS, SPACE, model_grid

from bids_roimae.config import PrepConfig
from bids_roimae.core.geometry import build_geometry
from bids_roimae.io.cache import load_entries
from bids_roimae.io.discovery import BoldRun
from bids_roimae.io.preparation import prepare_run


def make_entries(workdir: Path, grid, geometry, n_runs: int, n_frames: int):
    mask, template = grid.mask, grid.mask_img()
    out = workdir / "out"
    for i in range(n_runs):
        sub = f"{i + 1:02d}"
        path = workdir / "bids" / f"sub-{sub}_task-rest_space-{SPACE}_desc-preproc_bold.nii"
        if not path.is_file():
            rng = np.random.default_rng(i)
            data = np.zeros(grid.shape + (n_frames,), np.float32)
            data[mask] = rng.normal(1000, 20, size=(int(mask.sum()), n_frames))
            path.parent.mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(data, grid.affine), path)
            del data
        run = BoldRun(sub, None, "rest", None, {"subject": sub, "task": "rest"}, path, None,
                      None, 2.0, "sidecar", SPACE)
        prepare_run(run, geometry, template, PrepConfig(), out, window=20)
    return load_entries(out, geometry)


def read_batches(entries, tokens, rng, n_batches: int, batch: np.ndarray, how: str) -> float:
    """Fill ``batch`` (B, W, N, P) with random windows ``n_batches`` times; seconds.

    ``how``: "copyto" copies the memory-mapped slice with ``np.copyto`` (casting when the
    batch is float32); "window" uses ``CacheEntry.window(..., out=)``.
    """
    window = batch.shape[1]
    started = time.perf_counter()
    for _ in range(n_batches):
        for b in range(batch.shape[0]):
            i = int(rng.integers(len(tokens)))
            t0 = int(rng.integers(0, tokens[i].shape[0] - window + 1))
            if how == "window":
                entries[i].window(t0, window, out=batch[b])
            else:
                np.copyto(batch[b], tokens[i][t0:t0 + window], casting="unsafe")
    return time.perf_counter() - started


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=4)
    parser.add_argument("--frames", type=int, default=120)
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--window", type=int, default=20)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args(argv)
    workdir = args.workdir or Path(tempfile.gettempdir()) / "bids_roimae_bench_cache"
    grid = model_grid(with_atlas=False)
    geometry = build_geometry(grid.mask, grid.affine, None, patch_size=6)
    entries = make_entries(workdir, grid, geometry, args.runs, args.frames)
    tokens = [e.tokens() for e in entries]  # one memory map per run, opened once
    shape = (args.batch_size, args.window, geometry.n_tokens, geometry.patch_voxels)
    window_bytes = args.window * geometry.n_tokens * geometry.patch_voxels * 2
    read_bytes = args.batches * args.batch_size * window_bytes
    rng = np.random.default_rng(0)
    for e in entries:  # warm the page cache
        np.asarray(e.tokens()).sum(dtype=np.float32)
    result = {"runs": len(entries), "frames": args.frames, "window": args.window,
              "batch": list(shape), "window_mb": round(window_bytes / 2**20, 2),
              "mask": grid.mask_source, "python": platform.python_version(),
              "machine": platform.machine()}
    print(f"{'batch':<34}{'GB/s':>8}{'windows/s':>12}")
    cases = [("float16 batch, np.copyto", np.float16, "copyto"),
             ("float32 batch, np.copyto (cast)", np.float32, "copyto"),
             ("float32 batch, CacheEntry.window", np.float32, "window")]
    for label, dtype, how in cases:
        batch = np.empty(shape, dtype)
        read_batches(entries, tokens, rng, 2, batch, how)  # touch the batch pages once
        seconds = min(read_batches(entries, tokens, rng, args.batches, batch, how)
                      for _ in range(3))
        gbps = read_bytes / seconds / 1e9
        wps = args.batches * args.batch_size / seconds
        name = f"{np.dtype(dtype).name}_{how}"
        result[f"{name}_gb_per_s"] = round(gbps, 3)
        result[f"{name}_windows_per_s"] = round(wps, 1)
        print(f"{label:<34}{gbps:>8.2f}{wps:>12.1f}")
    result["target_gb_per_s"] = 1.0
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "bench_cache_read.json").write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
