"""Synthetic geometry and token runs for the training tests, and the torchrun worker.

Imported by the tests for :func:`make_geometry`, :class:`FakeEntry` and
:func:`make_entries`; run as a script under ``torch.distributed.run`` it pretrains a
tiny model on two CPU processes (gloo) and writes each rank's final weights digest.

    python -m torch.distributed.run --standalone --nproc_per_node 2 \
        tests/ddp_worker.py OUT_DIR
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np

from bids_roimae.config import AppConfig
from bids_roimae.core.geometry import build_geometry

GRID = (13, 17, 11)  # unequal so axis mix-ups fail


def make_geometry(patch_size: int = 3, grid=GRID, rule: str = "exact"):
    """An ellipsoid brain on an unequal grid with 8 slab-and-side regions.

    Labels split the brain into 4 slabs along y and 2 hemispheres along x, and leave a
    thin unlabelled shell at the edge so orphan patches exist.
    """
    idx = np.stack(np.meshgrid(*[np.arange(g) for g in grid], indexing="ij"), -1).astype(float)
    centre = (np.asarray(grid) - 1) / 2
    radii = np.asarray(grid) / 2 - 0.6
    r2 = (((idx - centre) / radii) ** 2).sum(-1)
    brain = r2 <= 1.0
    slab = np.minimum((idx[..., 1] / grid[1] * 4).astype(int), 3)
    side = (idx[..., 0] >= centre[0]).astype(int)
    labels = np.where(brain & (r2 <= 0.8), 1 + slab * 2 + side, 0).astype(np.int32)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = [-12.0, -17.0, -10.0]
    return build_geometry(brain, affine, labels, patch_size, rule)


class FakeEntry:
    """Stand-in for a cache entry: ``tokens()`` -> (T, N, P) float16, and run identity."""

    def __init__(self, tokens: np.ndarray, subject: str, run: str):
        self._tokens = tokens.astype(np.float16)
        self.subject = subject
        self.run_key = f"sub-{subject}_task-rest_run-{run}"
        self.n_frames = int(tokens.shape[0])

    def tokens(self) -> np.ndarray:
        return self._tokens

    def window(self, start: int, length: int, out=None) -> np.ndarray:
        block = self._tokens[start:start + length].astype(np.float32)
        if out is None:
            return block
        out[...] = block
        return out


def make_entries(geometry, n_subjects: int = 4, runs: int = 1, n_frames: int = 40,
                 seed: int = 0) -> list:
    """Structured runs: smooth spatial modes times slow oscillations, plus a little noise.

    A masked region is predictable from the visible ones (the modes are global and
    smooth), so a masked autoencoder's reconstruction loss can fall quickly.
    """
    rng = np.random.default_rng(seed)
    centres = geometry.centres_mm
    centres = (centres - centres.mean(0)) / (centres.std(0) + 1e-6)
    n, p = geometry.voxel_mask.shape
    offs = np.linspace(-0.3, 0.3, p)
    modes = np.stack([centres[:, 0], centres[:, 1], centres[:, 2],
                      centres[:, 0] * centres[:, 1]], axis=1)  # (N, 4)
    spatial = modes[:, :, None] + offs[None, None, :]  # (N, 4, P)
    entries = []
    for s in range(n_subjects):
        for r in range(runs):
            t = np.arange(n_frames)[:, None]
            freqs = rng.uniform(0.05, 0.25, size=4)
            phases = rng.uniform(0, 2 * np.pi, size=4)
            course = np.sin(2 * np.pi * freqs * t / 2 + phases)  # (T, 4)
            data = np.einsum("tk,nkp->tnp", course, spatial)
            data += 0.05 * rng.standard_normal(data.shape)
            data *= geometry.voxel_mask[None]
            entries.append(FakeEntry(data, f"{s:02d}", str(r + 1)))
    return entries


def tiny_config(steps: int = 6, **train) -> AppConfig:
    """A fast CPU configuration on the synthetic geometry (window 8, temporal patch 2)."""
    cfg = AppConfig()
    cfg.geometry.patch_size = 3
    cfg.geometry.window = 8
    cfg.geometry.temporal_patch = 2
    cfg.model.preset = "tiny"
    cfg.train.steps = steps
    cfg.train.batch_size = 4
    cfg.train.lr = 1e-3
    cfg.train.warmup_steps = 2
    cfg.train.log_every = 2
    cfg.train.checkpoint_every = 3
    cfg.train.val_fraction = 0.25
    cfg.train.val_batches = 1
    for key, value in train.items():
        setattr(cfg.train, key, value)
    return cfg.validate()


def _digest(state: dict) -> str:
    digest = hashlib.sha256()
    for key in sorted(state):
        digest.update(key.encode())
        digest.update(state[key].numpy().tobytes())
    return digest.hexdigest()


def main(out_dir: str) -> None:
    import torch

    from bids_roimae.training.pretrain import run_pretraining

    torch.set_num_threads(1)
    out = Path(out_dir)
    geometry = make_geometry()
    entries = make_entries(geometry)
    cfg = tiny_config(steps=4, checkpoint_every=2)
    live = {}

    def keep_weights(step, model):
        live.update({k: v.detach().clone() for k, v in model.state_dict().items()})

    final = run_pretraining(entries, geometry, cfg, out / "model", device="cpu", resume=False,
                            step_callback=keep_weights)
    rank = int(os.environ["RANK"])
    state = torch.load(final, map_location="cpu", weights_only=True)["model"]
    file_digest, live_digest = _digest(state), _digest(live)
    (out / f"rank{rank}.json").write_text(json.dumps({
        "rank": rank, "world": int(os.environ["WORLD_SIZE"]),
        "file_digest": file_digest, "live_digest": live_digest,
    }))


if __name__ == "__main__":
    main(sys.argv[1])
