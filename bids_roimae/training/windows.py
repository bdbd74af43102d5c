"""Model windows of prepared runs: where they start, reading them, embedding them.

A subject's windows are up to ``windows_per_run`` evenly spaced windows of each of its
runs; runs shorter than one window give none.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import Sequence

import numpy as np
import torch
from torch import nn

log = logging.getLogger(__name__)


def window_starts(n_frames: int, window: int, per_run: int) -> np.ndarray:
    """Start frames of up to ``per_run`` evenly spaced windows of ``window`` frames.

    A run shorter than one window gives none; windows overlap only when the run is
    shorter than ``per_run`` windows laid end to end.
    """
    if n_frames < window or per_run < 1:
        return np.zeros(0, dtype=np.int64)
    last = n_frames - window
    count = min(per_run, last + 1)
    return np.unique(np.round(np.linspace(0, last, count)).astype(np.int64))


def subject_windows(entries: Sequence, window: int, per_run: int
                    ) -> dict[str, list[tuple[object, int]]]:
    """``{subject: [(entry, start), ...]}`` over every run of every subject.

    Runs shorter than a window are skipped with a warning; subjects left without any
    window are absent from the result.
    """
    out: dict[str, list] = defaultdict(list)
    for entry in entries:
        starts = window_starts(int(entry.n_frames), window, per_run)
        if starts.size == 0:
            log.warning("%s has %d frames, fewer than one window of %d: skipped",
                        entry.run_key, entry.n_frames, window)
        out[str(entry.subject)].extend((entry, int(s)) for s in starts)
    return {s: refs for s, refs in sorted(out.items()) if refs}


def load_windows(refs: Sequence[tuple[object, int]], window: int) -> np.ndarray:
    """Read windows from cache entries: float32 array of shape (K, W, N, P)."""
    if not refs:
        raise ValueError("no window to load")
    maps = {}  # one memory map per run, however many of its windows are read
    for entry, _ in refs:
        if id(entry) not in maps:
            maps[id(entry)] = entry.tokens()
    shape = maps[id(refs[0][0])].shape[1:]
    out = np.empty((len(refs), window) + tuple(shape), np.float32)
    for k, (entry, start) in enumerate(refs):
        # CacheEntry.window converts float16 (or scaled int8) in one vectorised copy
        entry.window(start, window, out=out[k], tokens=maps[id(entry)])
    return out


def batches(refs: Sequence, size: int):
    """Consecutive chunks of ``refs`` of at most ``size`` items."""
    for i in range(0, len(refs), size):
        yield refs[i:i + size]


@torch.no_grad()
def embed_windows(encoder: nn.Module, refs: Sequence, window: int, batch_size: int,
                  device) -> np.ndarray:
    """Encoder embeddings of windows, shape (K, D) float32 (all tokens visible)."""
    encoder.eval()
    out = []
    for chunk in batches(list(refs), max(1, batch_size)):
        x = torch.from_numpy(load_windows(chunk, window)).to(device)
        with autocast(device):
            out.append(encoder.embed(x).float().cpu().numpy())
    return np.concatenate(out).astype(np.float32)


@torch.no_grad()
def embed_loaded(encoder: nn.Module, windows: np.ndarray, batch_size: int, device
                 ) -> np.ndarray:
    """Encoder embeddings (K, D) float32 of windows already in memory ``(K, W, N, P)``."""
    encoder.eval()
    out = []
    for start in range(0, len(windows), max(1, batch_size)):
        x = torch.from_numpy(np.ascontiguousarray(windows[start:start + batch_size])).to(device)
        with autocast(device):
            out.append(encoder.embed(x).float().cpu().numpy())
    return np.concatenate(out).astype(np.float32)


def autocast(device):
    """bf16 autocast on CUDA, a no-op elsewhere (CPU runs in float32)."""
    dev = torch.device(device)
    return torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda")
