"""Time pretraining steps on synthetic tokens at the real brain-token geometry.

Geometry: the MNI152NLin2009cAsym 2 mm brain mask (1,486 patches of 6^3 voxels) when
``--mask`` (default: the shared reference copy) exists, else an ellipsoid of similar size;
regions are blocks of 12 voxels (about the AAL3 region count). A window of 20 frames with
temporal patch 4 is 5 x 1,486 = 7,430 tokens; one *sample* is one such window.

Reports per configuration: step time, tokens/s, samples/s, peak memory, FLOPs per step
(``torch.utils.flop_counter.FlopCounterMode``), model FLOP utilisation against
``--peak-tflops`` (default from the GPU name: H100/H200 989 dense bf16), and the share of
wall time the training loop waited for its input pipeline. Writes
``benchmarks/results/bench_pretrain.json``.

    python benchmarks/bench_pretrain.py                      # CPU: tiny, few steps
    python benchmarks/bench_pretrain.py --presets small,base # CUDA: bf16
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from bids_roimae.config import AppConfig
from bids_roimae.core.geometry import build_geometry
from bids_roimae.core.masking import region_groups
from bids_roimae.model.mae import build_model, count_parameters, resolve_model_config
from bids_roimae.training.sampling import Prefetcher, TokenFeed, step_plan, window_index

MASK = Path("/work/shared/data/tpl-MNI152NLin2009cAsym/"
            "tpl-MNI152NLin2009cAsym_res-02_desc-brain_mask.nii.gz")
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0}
DEFAULT_BATCH = {"tiny": 2, "small": 32, "base": 16}


class SyntheticRun:
    """In-memory stand-in for a cache entry."""

    def __init__(self, tokens: np.ndarray, subject: str):
        self._tokens, self.subject = tokens, subject
        self.run_key, self.n_frames = f"sub-{subject}_task-rest", tokens.shape[0]

    def tokens(self):
        return self._tokens


def make_geometry(mask_path: Path, patch_size: int):
    """Real template brain mask if readable, else an ellipsoid; block regions."""
    source = "ellipsoid"
    if mask_path.is_file():
        import nibabel as nib

        img = nib.load(str(mask_path))
        brain, affine, source = np.asarray(img.dataobj) > 0, img.affine, str(mask_path)
    else:
        grid = np.array([97, 115, 97])
        idx = np.stack(np.meshgrid(*[np.arange(g) for g in grid], indexing="ij"), -1)
        radii = np.array([35.5, 44.0, 38.0])
        brain = ((((idx - grid / 2) / radii) ** 2).sum(-1)) <= 1.0
        affine = np.diag([2.0, 2.0, 2.0, 1.0])
        affine[:3, 3] = [-96.5, -132.5, -78.5]
    ijk = np.stack(np.meshgrid(*[np.arange(s) for s in brain.shape], indexing="ij"), -1) // 12
    labels = np.where(brain, 1 + ijk[..., 0] + 9 * ijk[..., 1] + 90 * ijk[..., 2], 0)
    return build_geometry(brain, affine, labels.astype(np.int32), patch_size), source


def count_flops(model, x, mask, autocast) -> float:
    """FLOPs of one forward + backward pass."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        with autocast():
            loss, _ = model(x, mask)
        loss.backward()
    model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def bench_one(preset, attention, args, geometry, entries, device) -> dict:
    cfg = AppConfig()
    cfg.geometry.patch_size, cfg.geometry.window = args.patch_size, args.window
    cfg.geometry.temporal_patch = args.temporal_patch
    cfg.model.preset, cfg.model.attention = preset, attention
    cfg.masking.strategy, cfg.masking.ratio = args.masking, args.ratio
    cfg.validate()
    cuda = device.type == "cuda"
    batch = args.batch or DEFAULT_BATCH.get(preset, 8)
    n_time = args.window // args.temporal_patch
    torch.manual_seed(0)
    model = build_model(cfg, geometry).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95),
                            fused=True if cuda else None)
    net = torch.compile(model) if args.compile else model
    index = window_index(entries, args.window)
    groups = region_groups(geometry)
    feed = TokenFeed(entries, args.window, device, resident=cuda)

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda)

    def plan(step):
        return step_plan(index, step, 0, batch, 0, 1, cfg.masking, groups, n_time)

    total = args.warmup + args.steps
    prefetch = Prefetcher(feed, plan, 0, total)
    wait = 0.0
    try:
        for step in range(total):
            if step == args.warmup:
                if cuda:
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                wait, t0 = 0.0, time.perf_counter()
            tw = time.perf_counter()
            x, mask = prefetch.get(step)
            wait += time.perf_counter() - tw
            with autocast():
                loss, _ = net(x, mask)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        final_loss = float(loss.detach())  # also waits for the GPU
        elapsed = time.perf_counter() - t0
    finally:
        prefetch.close()
    peak = torch.cuda.max_memory_allocated(device) / 2 ** 30 if cuda else None
    entry, start, masks = plan(0)
    x, mask = feed.to_device(entry, start), torch.from_numpy(masks)
    flops = count_flops(model, x, mask, autocast)
    # input pipeline alone: how many samples/s it could deliver
    t1 = time.perf_counter()
    pipe = Prefetcher(feed, plan, 0, 6)
    for step in range(6):
        pipe.get(step)
    if cuda:
        torch.cuda.synchronize()
    pipe_rate = 6 * batch / (time.perf_counter() - t1)
    pipe.close()
    step_s = elapsed / args.steps
    tokens = batch * n_time * geometry.n_tokens
    result = {
        "preset": preset, "attention": attention, "masking": args.masking,
        "ratio": args.ratio, "batch": batch, "device": str(device),
        "params_M": round(count_parameters(model) / 1e6, 2),
        "step_s": round(step_s, 4), "samples_per_s": round(batch / step_s, 2),
        "tokens_per_s": round(tokens / step_s, 1), "tokens_per_sample": n_time * geometry.n_tokens,
        "flops_per_step": flops, "tflops_per_s": round(flops / step_s / 1e12, 3),
        "peak_mem_GiB": None if peak is None else round(peak, 2),
        "data_wait_fraction": round(wait / elapsed, 4),
        "pipeline_samples_per_s": round(pipe_rate, 1), "loss": round(final_loss, 4),
        "model": resolve_model_config(cfg.model),
    }
    if args.peak_tflops:
        result["mfu"] = round(flops / step_s / (args.peak_tflops * 1e12), 4)
    return result


def run_with_backoff(preset, attention, args, geometry, entries, device) -> dict:
    """Halve the batch on CUDA out-of-memory until it fits."""
    import gc

    batch = args.batch or DEFAULT_BATCH.get(preset, 8)
    while True:
        args_b = argparse.Namespace(**{**vars(args), "batch": batch})
        try:
            return bench_one(preset, attention, args_b, geometry, entries, device)
        except torch.cuda.OutOfMemoryError:
            if batch == 1:
                raise
        # outside the except block, so the failed attempt's tensors can be freed
        gc.collect()
        torch.cuda.empty_cache()
        batch //= 2
        print(f"  out of memory; retrying {preset}/{attention} with batch {batch}",
              file=sys.stderr)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", default=None,
                    help="comma list (default: tiny on CPU, small,base on CUDA)")
    ap.add_argument("--attention", default="both", choices=["both", "divided", "joint"])
    ap.add_argument("--joint-presets", default="tiny,small",
                    help="presets that also run joint attention when --attention both")
    ap.add_argument("--masking", default="roi", choices=["roi", "random"])
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None, help="timed steps")
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--window", type=int, default=20)
    ap.add_argument("--temporal-patch", type=int, default=4)
    ap.add_argument("--patch-size", type=int, default=6)
    ap.add_argument("--runs", type=int, default=None, help="synthetic runs of --frames each")
    ap.add_argument("--frames", type=int, default=100)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--peak-tflops", type=float, default=None)
    ap.add_argument("--mask", type=Path, default=MASK)
    ap.add_argument("--out", type=Path,
                    default=Path(__file__).resolve().parent / "results" / "bench_pretrain.json")
    args = ap.parse_args(argv)

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if args.device == "auto" else args.device))
    cuda = device.type == "cuda"
    if not cuda:
        torch.set_num_threads(max(1, torch.get_num_threads()))
    presets = (args.presets or ("small,base" if cuda else "tiny")).split(",")
    args.steps = args.steps or (10 if cuda else 2)
    args.warmup = args.warmup if args.warmup is not None else (3 if cuda else 1)
    gpu_name = torch.cuda.get_device_name(device) if cuda else platform.processor() or "cpu"
    if args.peak_tflops is None and cuda:
        args.peak_tflops = next((v for k, v in PEAK_TFLOPS.items() if k in gpu_name), None)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True

    geometry, source = make_geometry(args.mask, args.patch_size)
    rng = np.random.default_rng(0)
    n_runs = args.runs or (8 if cuda else 2)
    if not cuda and args.runs is None:
        args.frames = min(args.frames, 40)
    shape = (args.frames, geometry.n_tokens, geometry.patch_voxels)
    entries = [SyntheticRun((rng.standard_normal(shape, dtype=np.float32)
                             * geometry.voxel_mask).astype(np.float16), f"{i:02d}")
               for i in range(n_runs)]
    print(f"device {gpu_name}; geometry from {source}: {geometry.n_tokens} tokens of "
          f"{args.patch_size}^3, window {args.window}, temporal patch {args.temporal_patch} -> "
          f"{geometry.n_tokens * args.window // args.temporal_patch} tokens/window; "
          f"{len(region_groups(geometry).groups)} regions; masking {args.masking} {args.ratio}")

    results = []
    for preset in presets:
        attentions = ["divided", "joint"] if args.attention == "both" else [args.attention]
        if args.attention == "both" and preset not in args.joint_presets.split(","):
            attentions = ["divided"]
        for attention in attentions:
            t0 = time.perf_counter()
            res = run_with_backoff(preset, attention, args, geometry, entries, device)
            res["bench_wall_s"] = round(time.perf_counter() - t0, 1)
            results.append(res)
            print(f"  {preset}/{attention}: {res['samples_per_s']} samples/s done "
                  f"in {res['bench_wall_s']} s", file=sys.stderr)

    head = ("preset", "attention", "batch", "step_s", "samples_per_s", "tokens_per_s",
            "tflops_per_s", "mfu", "peak_mem_GiB", "data_wait_fraction",
            "pipeline_samples_per_s")
    print("\t".join(head))
    for r in results:
        print("\t".join(str(r.get(h, "n/a")) for h in head))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "device": gpu_name, "torch": str(torch.__version__), "geometry_source": source,
        "n_tokens": geometry.n_tokens, "window": args.window,
        "temporal_patch": args.temporal_patch, "peak_tflops": args.peak_tflops,
        "results": results}, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
