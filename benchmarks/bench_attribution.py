"""Time one participant's Integrated Gradients and region fidelity on CPU.

IG: real geometry size by default, 1,486 tokens x 216 voxels (MNI152NLin2009cAsym 2 mm,
patch 6), window 20, temporal patch 4, the ``tiny`` preset, 8 windows, 32 steps.

Region fidelity (``--fidelity-regions``, 0 = every region, -1 = skip): on a real token
geometry (``--mask`` and ``--atlas`` label files on the model grid, else the template and
AAL3 found in the TemplateFlow and nilearn caches the app uses, else a generated brain of
the same size), one window, timed side by side in the same run: batched
(:func:`bids_roimae.analysis.fidelity.region_fidelity`) against one region per forward
pass of the full model (what predict did before), with the largest difference of the
numbers.

    python benchmarks/bench_attribution.py [--windows 8] [--steps 32] [--batch-size 16]
        [--min-steps 8] [--threads 2] [--fidelity-regions 0] [--fidelity-batch 0]
        [--mask MASK.nii.gz --atlas LABELS.nii.gz] [--patch-size 6] [--rule exact]

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


def build(n_tokens: int, patch_voxels: int, window: int, temporal_patch: int, preset: str,
          geometry=None):
    from bids_roimae.config import ModelConfig
    from bids_roimae.model.classifier import Classifier
    from bids_roimae.model.mae import RoiMAE, resolve_model_config

    if geometry is not None:
        centres, voxel_mask = geometry.centres_mm, geometry.voxel_mask
    else:
        side = int(np.ceil(n_tokens ** (1 / 3)))
        ijk = np.stack(np.unravel_index(np.arange(n_tokens), (side, side, side)), axis=1)
        centres = ijk * 12.0 - 80.0
        voxel_mask = np.ones((n_tokens, patch_voxels), bool)
    sizes = resolve_model_config(ModelConfig(preset=preset))
    mae = RoiMAE(centres, voxel_mask, temporal_patch, window // temporal_patch, **sizes)
    head = nn.Linear(sizes["embed_dim"], 1)
    return mae, Classifier(mae, head, sizes["embed_dim"])


def fidelity_geometry(args):
    """A token geometry for the fidelity benchmark, and where it came from."""
    import nibabel as nib

    from bids_roimae.core.geometry import build_geometry

    if args.mask and args.atlas:
        mask_img = nib.load(args.mask)
        labels = np.asarray(nib.load(args.atlas).dataobj)
        if labels.shape != mask_img.shape:
            from nilearn.image import resample_to_img

            labels = np.asarray(resample_to_img(nib.load(args.atlas), mask_img,
                                                interpolation="nearest",
                                                force_resample=True,
                                                copy_header=True).dataobj)
        mask = np.asarray(mask_img.dataobj) > 0
        return (build_geometry(mask, mask_img.affine, labels.astype(np.int32),
                               args.patch_size, args.rule), "given files")
    try:  # the caches the app itself reads (no download: offline is fine)
        from bids_roimae.io.atlas import load_atlas, resample_labels
        from bids_roimae.io.templates import load_template

        template = load_template("MNI152NLin2009cAsym", resolution=2)
        labels, _ = resample_labels(load_atlas("AAL3"), template.mask_img)
        mask = np.asarray(template.mask_img.dataobj) > 0
        return (build_geometry(mask, template.mask_img.affine, labels, args.patch_size,
                               args.rule), "TemplateFlow + nilearn caches")
    except Exception as exc:  # noqa: BLE001 - any failure means: generate instead
        print(f"no cached template/atlas ({type(exc).__name__}); generated geometry")
    # An ellipsoid brain of the template's extent, cut into 166 slab regions.
    shape = (97, 115, 97)
    idx = np.indices(shape).astype(float)
    centre, radii = [(s - 1) / 2 for s in shape], (36.0, 45.0, 38.0)
    brain = sum(((idx[a] - centre[a]) / radii[a]) ** 2 for a in range(3)) <= 1.0
    rng = np.random.default_rng(0)
    seeds = np.argwhere(brain)[rng.choice(int(brain.sum()), 166, replace=False)]
    from scipy.spatial import cKDTree

    labels = np.zeros(shape, np.int32)
    labels[brain] = cKDTree(seeds).query(np.argwhere(brain))[1] + 1
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = [-96.5, -132.5, -78.5]
    return build_geometry(brain, affine, labels, args.patch_size, args.rule), "generated"


def one_region_at_a_time(mae, window, geometry, regions):
    """Reference: one (window, region) per forward pass of the full model."""
    owned = geometry.region_patches()
    n_time = mae.group_time(window).shape[1]
    errors, shifts = [], []
    with torch.inference_mode():
        reference = mae.embed(window)
        for region in regions:
            mask = torch.zeros(1, n_time, geometry.n_tokens, dtype=torch.bool)
            mask[:, :, torch.as_tensor(owned[region])] = True
            err, emb = mae.errors_and_embedding(window, mask)
            errors.append(float(err[mask].mean()))
            shifts.append(float((emb - reference).norm()))
    return np.asarray(errors), np.asarray(shifts)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=1486)
    ap.add_argument("--patch-voxels", type=int, default=216)
    ap.add_argument("--window", type=int, default=20)
    ap.add_argument("--temporal-patch", type=int, default=4)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=0,
                    help="IG window-steps per pass (0: sized from free memory)")
    ap.add_argument("--min-steps", type=int, default=None,
                    help="adaptive integration: start with this many points")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--fidelity-regions", type=int, default=0,
                    help="regions for the fidelity timing (0: every region, -1: skip)")
    ap.add_argument("--fidelity-batch", type=int, default=0,
                    help="(window, region) pairs per pass (0: sized from free memory)")
    ap.add_argument("--mask", default=None, help="brain mask NIfTI of the model grid")
    ap.add_argument("--atlas", default=None, help="atlas label NIfTI (resampled to --mask)")
    ap.add_argument("--patch-size", type=int, default=6)
    ap.add_argument("--rule", default="exact", choices=("exact", "majority"))
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"
                                         / "bench_attribution.json"))
    args = ap.parse_args(argv)

    from bids_roimae.analysis.attribution import integrated_gradients
    from bids_roimae.analysis.fidelity import region_fidelity

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    record = {
        "machine": platform.processor() or platform.machine(), "threads": args.threads,
        "torch": torch.__version__, "tokens": args.tokens, "patch_voxels": args.patch_voxels,
        "window": args.window, "temporal_patch": args.temporal_patch, "preset": args.preset,
        "windows": args.windows, "steps": args.steps, "min_steps": args.min_steps,
        "batch_size": args.batch_size,
        "load_average": list(__import__("os").getloadavg()),
    }
    rows = []
    if args.windows > 0:  # --windows 0 times region fidelity only
        _, classifier = build(args.tokens, args.patch_voxels, args.window,
                              args.temporal_patch, args.preset)
        windows = torch.randn(args.windows, args.window, args.tokens, args.patch_voxels)
        t0, c0 = time.perf_counter(), time.process_time()
        result = integrated_gradients(classifier, windows, steps=args.steps,
                                      batch_size=args.batch_size, min_steps=args.min_steps)
        ig_s, ig_cpu = time.perf_counter() - t0, time.process_time() - c0
        rows.append(("integrated_gradients", ig_s, args.windows * result.steps / ig_s,
                     f"{ig_cpu:.0f} CPU-s; {result.steps} steps used, max rel. completeness "
                     f"error {result.max_relative_error:.2e}"))
        record.update(steps_used=result.steps, ig_seconds=ig_s, ig_cpu_seconds=ig_cpu,
                      ig_window_steps_per_s=args.windows * result.steps / ig_s,
                      ig_max_relative_error=result.max_relative_error)
    if args.fidelity_regions >= 0:
        geometry, source = fidelity_geometry(args)
        regions = sorted(geometry.region_patches())
        if args.fidelity_regions:  # a spread of sizes, small to large
            by_size = sorted(regions, key=lambda r: geometry.region_patches()[r].size)
            pick = np.linspace(0, len(by_size) - 1, min(args.fidelity_regions, len(by_size)))
            regions = sorted({by_size[int(round(i))] for i in pick})
        mae_f, _ = build(geometry.n_tokens, geometry.patch_voxels, args.window,
                         args.temporal_patch, args.preset, geometry=geometry)
        one_window = torch.randn(1, args.window, geometry.n_tokens, geometry.patch_voxels)
        one_window *= torch.as_tensor(geometry.voxel_mask)
        t0 = time.perf_counter()
        batched = region_fidelity(mae_f, one_window, geometry, regions=regions,
                                  batch_size=args.fidelity_batch)
        batched_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        single_err, single_shift = one_region_at_a_time(mae_f, one_window, geometry, regions)
        single_s = time.perf_counter() - t0
        diff = max(float(np.max(np.abs(batched["error"].to_numpy() - single_err))),
                   float(np.max(np.abs(batched["embedding_shift"].to_numpy()
                                       - single_shift))))
        note = (f"{len(regions)} regions x 1 window, {geometry.n_tokens} tokens "
                f"({geometry.rule}, {source})")
        rows.append(("fidelity_one_at_a_time", single_s, len(regions) / single_s, note))
        rows.append(("fidelity_batched", batched_s, len(regions) / batched_s,
                     f"{single_s / batched_s:.2f}x faster; max |difference| {diff:.1e}"))
        record.update(fidelity_regions=len(regions), fidelity_tokens=geometry.n_tokens,
                      fidelity_rule=geometry.rule, fidelity_geometry=source,
                      fidelity_batched_seconds=batched_s,
                      fidelity_one_at_a_time_seconds=single_s,
                      fidelity_speedup=single_s / batched_s, fidelity_max_difference=diff)

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
