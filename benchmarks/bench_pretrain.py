"""Pretraining throughput at the real brain-token geometry: ROI-guided vs random masking.

Geometry: the template brain mask and AAL3 as the app finds them (TemplateFlow and nilearn
caches, see ``harness.py``), else a generated ellipsoid with box regions on the same grid;
patch 6 gives 1,486 brain patches, a window of 20 frames with temporal patch 4 is
5 x 1,486 = 7,430 tokens; one *sample* is one such window. Tokens are synthetic.

For every preset and attention layout, random and ROI masking (same ratio) are timed in
the same run and compared. Per configuration: step time, samples/s, tokens/s, FLOPs per
step (``torch.utils.flop_counter.FlopCounterMode``, forward + backward), model FLOP
utilisation (MFU) against the device's peak (CUDA: nominal dense bf16 by GPU name or
``--peak-tflops``; CPU: this machine's measured float32 matmul rate), peak memory, the
share of the timed loop spent waiting for the input pipeline, which
``scaled_dot_product_attention`` kernel ran (profiler), whether an attention mask reached
it (padding) and the visible-token counts, and whether the step also runs with one kernel
forced through ``torch.nn.attention.sdpa_kernel`` (``--force-backend``; flash by default:
on CUDA it refuses an attention mask, so it proves the unpadded path). Prints a table and
the ROI/random throughput ratio (target >= 0.95); writes
``benchmarks/results/bench_pretrain.json``.

    python benchmarks/bench_pretrain.py                      # CPU: tiny, a few steps
    python benchmarks/bench_pretrain.py --presets small,base # CUDA: bf16
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from harness import RESULTS, machine, model_grid

from bids_roimae.config import AppConfig
from bids_roimae.core.geometry import build_geometry
from bids_roimae.core.masking import region_groups
from bids_roimae.model.mae import build_model, count_parameters, resolve_model_config
from bids_roimae.training.sampling import Prefetcher, TokenFeed, step_plan, window_index

PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0}
DEFAULT_BATCH = {"tiny": 2, "small": 32, "base": 16}
RATIO_TARGET = 0.95
# profiler op name -> SDPA backend
SDPA_OPS = {
    "aten::_scaled_dot_product_flash_attention_for_cpu": "flash (cpu)",
    "aten::_scaled_dot_product_flash_attention": "flash",
    "aten::_scaled_dot_product_efficient_attention": "efficient",
    "aten::_scaled_dot_product_cudnn_attention": "cudnn",
    "aten::_scaled_dot_product_attention_math": "math",
}


class SyntheticRun:
    """In-memory stand-in for a cache entry."""

    def __init__(self, tokens: np.ndarray, subject: str):
        self._tokens, self.subject = tokens, subject
        self.run_key, self.n_frames = f"sub-{subject}_task-rest", tokens.shape[0]

    def tokens(self):
        return self._tokens


def make_geometry(patch_size: int):
    """The benchmark grid (template + AAL3 from the caches, else generated) as tokens."""
    grid = model_grid(with_atlas=True)
    geometry = build_geometry(grid.mask, grid.affine, grid.labels, patch_size)
    return geometry, f"{grid.mask_source}; regions {grid.labels_source}"


def cpu_peak_tflops(threads: int) -> float:
    """This CPU's float32 matmul rate (TFLOP/s), best of a few 1024^3 products."""
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(4):
            torch.mm(a, b)
        best = min(best, (time.perf_counter() - t0) / 4)
    return 2 * 1024 ** 3 / best / 1e12


@contextlib.contextmanager
def sdpa_calls(record: list):
    """Record every ``scaled_dot_product_attention`` call's key length and mask."""
    original = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kw):
        record.append((int(k.shape[-2]), attn_mask is not None))
        return original(q, k, v, attn_mask=attn_mask, **kw)

    F.scaled_dot_product_attention = spy
    try:
        yield record
    finally:
        F.scaled_dot_product_attention = original


def probe_attention(model, x, mask, autocast, device, force: str) -> dict:
    """One forward + backward under the profiler: kernel, masks, visible tokens; then the
    same step with ``force`` as the only allowed SDPA backend."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA]
                                           if device.type == "cuda" else [])
    calls: list = []
    with profile(activities=activities) as prof, sdpa_calls(calls):
        with autocast():
            loss, _ = model(x, mask, return_pred=False)
        loss.backward()
    model.zero_grad(set_to_none=True)
    names = {e.key for e in prof.key_averages()}
    backends = sorted({v for k, v in SDPA_OPS.items() if k in names})
    visible = (~mask).sum(dim=(1, 2)) if mask.dtype == torch.bool else None
    out = {"sdpa_backend": ",".join(backends) or "none",
           "sdpa_calls": len(calls),
           "sdpa_attn_mask_calls": sum(masked for _, masked in calls),
           "visible_tokens_per_sample": sorted({int(v) for v in visible.tolist()})
           if visible is not None else None}
    backend = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
               "math": SDPBackend.MATH, "cudnn": SDPBackend.CUDNN_ATTENTION}[force]
    try:
        with sdpa_kernel([backend]):
            with autocast():
                loss, _ = model(x, mask, return_pred=False)
            loss.backward()
        out[f"forced_{force}"] = "ok"
    except RuntimeError as exc:
        out[f"forced_{force}"] = "fails: " + str(exc).strip().splitlines()[0][:120]
    model.zero_grad(set_to_none=True)
    return out


def count_flops(model, x, mask, autocast) -> float:
    """FLOPs of one forward + backward pass."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        with autocast():
            loss, _ = model(x, mask, return_pred=False)
        loss.backward()
    model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def bench_one(preset, attention, masking, args, geometry, entries, device) -> dict:
    """Time ``args.steps`` optimiser steps (after ``args.warmup``) of one configuration."""
    cfg = AppConfig()
    cfg.geometry.patch_size, cfg.geometry.window = args.patch_size, args.window
    cfg.geometry.temporal_patch = args.temporal_patch
    cfg.model.preset, cfg.model.attention = preset, attention
    cfg.masking.strategy, cfg.masking.ratio = masking, args.ratio
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
                wait, t0, c0 = 0.0, time.perf_counter(), time.process_time()
            tw = time.perf_counter()
            x, mask = prefetch.get(step)
            wait += time.perf_counter() - tw
            with autocast():
                loss, _ = net(x, mask, return_pred=False)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        final_loss = float(loss.detach())  # also waits for the GPU
        elapsed, cpu_s = time.perf_counter() - t0, time.process_time() - c0
    finally:
        prefetch.close()
    peak = torch.cuda.max_memory_allocated(device) / 2 ** 30 if cuda else None
    entry, start, masks = plan(0)
    x, mask = feed.to_device(entry, start), torch.from_numpy(masks).to(device)
    flops = count_flops(model, x, mask, autocast)
    probe = probe_attention(model, x, mask, autocast, device, args.force_backend)
    masked_fraction = float(masks.mean())
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
        "preset": preset, "attention": attention, "masking": masking,
        "ratio": args.ratio, "masked_fraction": round(masked_fraction, 4), "batch": batch,
        "device": str(device), "params_M": round(count_parameters(model) / 1e6, 2),
        "step_s": round(step_s, 4), "samples_per_s": round(batch / step_s, 2),
        # on a shared CPU the wall rate depends on the neighbours; CPU time does less
        "cpu_s_per_sample": round(cpu_s / (args.steps * batch), 3),
        "tokens_per_s": round(tokens / step_s, 1), "tokens_per_sample": n_time * geometry.n_tokens,
        "flops_per_step": flops, "tflops_per_s": round(flops / step_s / 1e12, 4),
        "peak_mem_GiB": None if peak is None else round(peak, 2),
        "data_wait_fraction": round(wait / elapsed, 4),
        "pipeline_samples_per_s": round(pipe_rate, 1), "loss": round(final_loss, 4),
        "model": resolve_model_config(cfg.model), **probe,
    }
    if args.peak_tflops:
        result["mfu"] = round(flops / step_s / (args.peak_tflops * 1e12), 4)
    return result


def run_with_backoff(preset, attention, masking, args, geometry, entries, device) -> dict:
    """Halve the batch on CUDA out-of-memory until it fits."""
    import gc

    batch = args.batch or DEFAULT_BATCH.get(preset, 8)
    while True:
        args_b = argparse.Namespace(**{**vars(args), "batch": batch})
        try:
            return bench_one(preset, attention, masking, args_b, geometry, entries, device)
        except torch.cuda.OutOfMemoryError:
            if batch == 1:
                raise
        # outside the except block, so the failed attempt's tensors can be freed
        gc.collect()
        torch.cuda.empty_cache()
        batch //= 2
        print(f"  out of memory; retrying {preset}/{attention}/{masking} with batch {batch}",
              file=sys.stderr)


COLUMNS = ("preset", "attention", "masking", "batch", "step_s", "samples_per_s",
           "cpu_s_per_sample",
           "tflops_per_s", "mfu", "peak_mem_GiB", "data_wait_fraction", "sdpa_backend",
           "sdpa_attn_mask_calls", "forced")


def print_table(results: list, force: str) -> None:
    rows = [[str(r.get(c if c != "forced" else f"forced_{force}", "n/a")) for c in COLUMNS]
            for r in results]
    header = [c if c != "forced" else f"forced {force}" for c in COLUMNS]
    widths = [max(len(h), *(len(row[i][:40]) for row in rows)) for i, h in enumerate(header)]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    for row in rows:
        print("  ".join(v[:40].ljust(w) for v, w in zip(row, widths)))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", default=None,
                    help="comma list (default: tiny on CPU, small,base on CUDA)")
    ap.add_argument("--attention", default="divided", choices=["both", "divided", "joint"])
    ap.add_argument("--joint-presets", default="tiny,small",
                    help="presets that also run joint attention when --attention both")
    ap.add_argument("--masking", default="random,roi",
                    help="comma list of masking strategies compared in this run")
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
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (torch)")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--peak-tflops", type=float, default=None)
    ap.add_argument("--force-backend", default="flash",
                    choices=["flash", "efficient", "math", "cudnn"],
                    help="SDPA kernel the probe step is forced onto")
    ap.add_argument("--out", type=Path, default=RESULTS / "bench_pretrain.json")
    args = ap.parse_args(argv)

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if args.device == "auto" else args.device))
    cuda = device.type == "cuda"
    if args.threads:
        torch.set_num_threads(args.threads)
    presets = (args.presets or ("small,base" if cuda else "tiny")).split(",")
    maskings = args.masking.split(",")
    args.steps = args.steps or (10 if cuda else 2)
    args.warmup = args.warmup if args.warmup is not None else (3 if cuda else 1)
    gpu_name = torch.cuda.get_device_name(device) if cuda else platform.processor() or "cpu"
    peak_source = "--peak-tflops"
    if args.peak_tflops is None and cuda:
        args.peak_tflops = next((v for k, v in PEAK_TFLOPS.items() if k in gpu_name), None)
        peak_source = "nominal dense bf16"
    elif args.peak_tflops is None:
        args.peak_tflops = round(cpu_peak_tflops(torch.get_num_threads()), 4)
        peak_source = f"measured float32 matmul, {torch.get_num_threads()} threads"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True

    geometry, source = make_geometry(args.patch_size)
    rng = np.random.default_rng(0)
    n_runs = args.runs or (8 if cuda else 2)
    if not cuda and args.runs is None:
        args.frames = min(args.frames, 40)
    shape = (args.frames, geometry.n_tokens, geometry.patch_voxels)
    entries = [SyntheticRun((rng.standard_normal(shape, dtype=np.float32)
                             * geometry.voxel_mask).astype(np.float16), f"{i:02d}")
               for i in range(n_runs)]
    print(f"device {gpu_name}; peak {args.peak_tflops} TFLOP/s ({peak_source})\n"
          f"geometry: {source}\n{geometry.n_tokens} tokens of {args.patch_size}^3, window "
          f"{args.window}, temporal patch {args.temporal_patch} -> "
          f"{geometry.n_tokens * args.window // args.temporal_patch} tokens/window; "
          f"{len(region_groups(geometry).groups)} regions; masking ratio {args.ratio}")

    results, ratios = [], []
    for preset in presets:
        attentions = ["divided", "joint"] if args.attention == "both" else [args.attention]
        if args.attention == "both" and preset not in args.joint_presets.split(","):
            attentions = ["divided"]
        for attention in attentions:
            by_masking = {}
            for masking in maskings:
                t0 = time.perf_counter()
                res = run_with_backoff(preset, attention, masking, args, geometry, entries,
                                       device)
                res["bench_wall_s"] = round(time.perf_counter() - t0, 1)
                results.append(res)
                by_masking[masking] = res
                print(f"  {preset}/{attention}/{masking}: {res['samples_per_s']} samples/s "
                      f"({res['bench_wall_s']} s)", file=sys.stderr)
            if {"roi", "random"} <= set(by_masking):
                ratio = by_masking["roi"]["samples_per_s"] / by_masking["random"]["samples_per_s"]
                cpu = (by_masking["random"]["cpu_s_per_sample"]
                       / by_masking["roi"]["cpu_s_per_sample"])
                ratios.append({"preset": preset, "attention": attention,
                               "roi_over_random": round(ratio, 3),
                               "roi_over_random_cpu_time": round(cpu, 3)})

    print_table(results, args.force_backend)
    for r in ratios:
        verdict = "meets" if r["roi_over_random"] >= RATIO_TARGET else "BELOW"
        print(f"roi/random samples/s, {r['preset']}/{r['attention']}: "
              f"{r['roi_over_random']:.3f} ({verdict} the {RATIO_TARGET} target); by CPU "
              f"time per sample {r['roi_over_random_cpu_time']:.3f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "device": gpu_name, **machine(), "geometry_source": source,
        "n_tokens": geometry.n_tokens, "window": args.window,
        "temporal_patch": args.temporal_patch, "peak_tflops": args.peak_tflops,
        "peak_source": peak_source, "ratio_target": RATIO_TARGET,
        "roi_over_random": ratios, "results": results}, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
