"""Windows for pretraining: subject split, per-step seeded sampling, batches on the device.

Every step's windows and masks come from ``np.random.default_rng([seed, step])`` alone,
so a resumed run sees exactly the batches an uninterrupted one would. Under DDP the
step's global batch (``batch * world`` windows) is drawn once and rank ``r`` takes slice
``r``: the set of windows per step does not depend on how it is split.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from bids_roimae.core.masking import make_batch_masks


@dataclass(frozen=True)
class WindowIndex:
    """All (entry, start frame) pairs of a set of runs.

    Attributes
    ----------
    entry : ndarray (M,)
        Position of the run in the entry list.
    start : ndarray (M,)
        First frame of the window.
    n_epoch_windows : int
        Non-overlapping windows (what one epoch means).
    """

    entry: np.ndarray
    start: np.ndarray
    n_epoch_windows: int

    def __len__(self) -> int:
        return int(self.entry.size)


def split_subjects(entries: Sequence, val_fraction: float, seed: int
                   ) -> tuple[list, list, list]:
    """Hold out whole subjects for validation.

    At least one subject is held out when there are two or more and ``val_fraction > 0``;
    at least one stays for training.

    Returns
    -------
    train_entries, val_entries, val_subjects
    """
    subjects = sorted({str(e.subject) for e in entries})
    n_val = 0
    if val_fraction > 0 and len(subjects) >= 2:
        n_val = min(max(1, int(round(val_fraction * len(subjects)))), len(subjects) - 1)
    order = np.random.default_rng([seed, 17]).permutation(len(subjects))
    val_subjects = sorted(subjects[i] for i in order[:n_val])
    held = set(val_subjects)
    train = [e for e in entries if str(e.subject) not in held]
    val = [e for e in entries if str(e.subject) in held]
    return train, val, val_subjects


def window_index(entries: Sequence, window: int) -> WindowIndex:
    """Every start frame of every run long enough for one window."""
    ent, start, epoch = [], [], 0
    for i, e in enumerate(entries):
        n = int(e.n_frames) - window + 1
        if n > 0:
            ent.append(np.full(n, i, np.int64))
            start.append(np.arange(n, dtype=np.int64))
            epoch += int(e.n_frames) // window
    if not ent:
        return WindowIndex(np.zeros(0, np.int64), np.zeros(0, np.int64), 0)
    return WindowIndex(np.concatenate(ent), np.concatenate(start), epoch)


def step_plan(index: WindowIndex, step: int, seed: int, batch: int, rank: int, world: int,
              masking, groups, n_time: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """This rank's windows and masks for one step.

    Returns
    -------
    entry, start : ndarray (batch,)
    masks : bool ndarray (batch, T', N)
    """
    rng = np.random.default_rng([seed, step])
    rows = rng.integers(0, len(index), size=batch * world)
    masks = make_batch_masks(masking.strategy, groups, masking.ratio, batch * world, n_time,
                             rng, masking.region_weighting, masking.per_chunk,
                             masking.roi_count)
    mine = slice(rank * batch, (rank + 1) * batch)
    return index.entry[rows[mine]], index.start[rows[mine]], masks[mine]


def fixed_plan(index: WindowIndex, n_windows: int, seed: int, masking, groups, n_time: int
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A fixed set of windows and masks (validation): same every time it is evaluated."""
    rng = np.random.default_rng([seed, 2 ** 31 - 1])
    replace = n_windows > len(index)
    rows = np.sort(rng.choice(len(index), size=n_windows, replace=replace))
    masks = make_batch_masks(masking.strategy, groups, masking.ratio, n_windows, n_time, rng,
                             masking.region_weighting, masking.per_chunk, masking.roi_count)
    return index.entry[rows], index.start[rows], masks


class TokenFeed:
    """Builds ``(B, W, N, P)`` float32 batches on the device from cache entries.

    ``resident=True`` copies every run's tokens to the GPU once (float16) and gathers
    windows there; otherwise windows are read from the memory maps into pinned host
    buffers (a small rotating pool, so a buffer is never refilled while its copy to the
    GPU may still be in flight) and copied asynchronously.
    """

    def __init__(self, entries: Sequence, window: int, device: torch.device,
                 resident: bool = False, pool: int = 3):
        self.entries, self.window, self.device = list(entries), int(window), device
        self.resident = bool(resident)
        self._arrays = [e.tokens() for e in self.entries]
        self._pin = device.type == "cuda"
        self._pool: dict = {}
        self._pool_size, self._turn = pool, 0
        self._lock = threading.Lock()
        if self.resident:
            lengths = [int(e.n_frames) for e in self.entries]
            self._offsets = torch.tensor(np.concatenate([[0], np.cumsum(lengths)[:-1]]),
                                         dtype=torch.long, device=device)
            first = self._arrays[0]
            store = torch.empty((sum(lengths),) + tuple(first.shape[1:]), dtype=torch.float16,
                                device=device)
            for off, arr in zip(np.concatenate([[0], np.cumsum(lengths)[:-1]]), self._arrays):
                for t0 in range(0, len(arr), 256):  # bounded host memory per copy
                    chunk = np.asarray(arr[t0:t0 + 256], dtype=np.float16)
                    store[int(off) + t0:int(off) + t0 + len(chunk)] = (
                        torch.from_numpy(chunk).to(device))
            self._store = store

    @staticmethod
    def total_bytes(entries: Sequence) -> int:
        """Bytes the entries take as float16 (what a resident copy needs)."""
        total = 0
        for e in entries:
            shape = e.tokens().shape
            total += int(np.prod(shape)) * 2
        return total

    def host_batch(self, entry: np.ndarray, start: np.ndarray) -> Optional[torch.Tensor]:
        """Read windows into a (pinned) float16 host buffer; ``None`` when resident."""
        if self.resident:
            return None
        shape = (len(entry), self.window) + tuple(self._arrays[0].shape[1:])
        with self._lock:
            key = (shape, self._turn % self._pool_size)
            self._turn += 1
            slot = self._pool.get(key)
        if slot is None:
            buf = torch.empty(shape, dtype=torch.float16, pin_memory=self._pin)
            slot = [buf, None]
            self._pool[key] = slot
        if slot[1] is not None:  # the copy that last read this buffer must be done
            slot[1].synchronize()
        out = slot[0].numpy()
        for i, (e, s) in enumerate(zip(entry, start)):
            np.copyto(out[i], self._arrays[int(e)][int(s):int(s) + self.window], casting="unsafe")
        return slot

    def to_device(self, entry: np.ndarray, start: np.ndarray, host=None) -> torch.Tensor:
        """The batch as float32 on the device, shape (B, W, N, P)."""
        if self.resident:
            e = torch.as_tensor(entry, device=self.device)
            s = torch.as_tensor(start, device=self.device)
            frames = (self._offsets[e] + s)[:, None] + torch.arange(self.window, device=self.device)
            return self._store[frames].float()
        if host is None:
            host = self.host_batch(entry, start)
        if self.device.type == "cuda":
            x = host[0].to(self.device, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            host[1] = event
            return x.float()
        return host[0].float()


class Prefetcher:
    """Prepares step ``k + 1``'s windows and masks on a thread while step ``k`` runs.

    ``plan(step)`` returns ``(entry, start, masks)``; :meth:`get` returns
    ``(x (B, W, N, P) float32 on the device, mask (B, T', N) bool on the host, pinned
    for CUDA)``: the model reads mask indices on the host without a GPU sync.
    """

    def __init__(self, feed: TokenFeed, plan, first_step: int, last_step: int):
        self.feed, self.plan, self.last = feed, plan, last_step
        self._pool = ThreadPoolExecutor(max_workers=1)
        self._pending = {}
        self._submit(first_step)

    def _prepare(self, step: int):
        entry, start, masks = self.plan(step)
        host = self.feed.host_batch(entry, start)
        mask = torch.from_numpy(masks)
        if self.feed.device.type == "cuda":
            mask = mask.pin_memory()
        return entry, start, host, mask

    def _submit(self, step: int) -> None:
        if step < self.last and step not in self._pending:
            self._pending[step] = self._pool.submit(self._prepare, step)

    def get(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        self._submit(step)
        entry, start, host, mask = self._pending.pop(step).result()
        x = self.feed.to_device(entry, start, host)
        self._submit(step + 1)
        return x, mask

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
