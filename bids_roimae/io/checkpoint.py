"""Atomic checkpoints: weights + configuration + token geometry + versions.

A checkpoint is a plain dict saved with ``torch.save`` and loadable with
``torch.load(weights_only=True)`` (only tensors, numbers, strings, lists and dicts), so a
shared model file cannot run code on load. Keys:

``model`` (state_dict), ``config`` (``AppConfig.to_dict()``), ``geometry``
(``TokenGeometry.to_arrays()`` with arrays as tensors), ``step``, ``optimizer``,
``scheduler``, ``rng`` (torch CPU/CUDA generator states), ``versions`` and ``extra``
(atlas name/hash/table, ``kind``, ...).
"""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from bids_roimae.io import atomic
from bids_roimae.config import AppConfig
from bids_roimae.errors import BadDataError, MissingInputError, OutputError
from bids_roimae.core.geometry import TokenGeometry


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module inside DistributedDataParallel and/or ``torch.compile`` wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def _to_plain(value: Any) -> Any:
    """numpy -> torch tensors / python scalars, recursively (weights_only-safe)."""
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value))
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {str(k): _to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    return value


def versions() -> dict:
    """Versions of the software that wrote a checkpoint."""
    from bids_roimae import __version__

    return {"bids_roimae": str(__version__), "torch": str(torch.__version__),
            "numpy": str(np.__version__), "python": platform.python_version()}


def rng_states() -> dict:
    """Torch generator states (CPU and, when present, every CUDA device)."""
    states = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = list(torch.cuda.get_rng_state_all())
    return states


def save_checkpoint(path, *, model: nn.Module, cfg: AppConfig, geometry: TokenGeometry,
                    step: int = 0, optimizer=None, scheduler=None,
                    extra: Optional[dict] = None) -> Path:
    """Write a checkpoint atomically (temporary file, then ``os.replace``).

    Parameters
    ----------
    path : path-like
        Destination file; its folder is created.
    model : nn.Module
        Saved unwrapped (DDP / compiled wrappers removed).
    cfg : AppConfig
    geometry : TokenGeometry
    step : int
        Optimiser steps done.
    optimizer : torch.optim.Optimizer, optional
    scheduler : object with ``state_dict()`` or a plain dict, optional
    extra : dict, optional
        Atlas name/hash/table (plain lists), ``kind`` ("pretrain", ...), anything plain.

    Returns
    -------
    Path
    """
    path = Path(path)
    payload = {
        "model": unwrap_model(model).state_dict(),
        "config": cfg.to_dict(),
        "geometry": _to_plain(geometry.to_arrays()),
        "step": int(step),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": (scheduler if isinstance(scheduler, dict) or scheduler is None
                      else scheduler.state_dict()),
        "rng": rng_states(),
        "versions": versions(),
        "extra": _to_plain(dict(extra or {})),
    }
    try:
        atomic.write_via(path, lambda tmp: torch.save(payload, tmp), fsync=False)
    except OSError as exc:
        raise OutputError(f"cannot write checkpoint {path}: {exc}") from exc
    return path


def load_checkpoint(path, map_location="cpu", mmap: bool = False) -> dict:
    """Read a checkpoint with ``weights_only=True``.

    ``mmap=True`` maps the tensors instead of reading them, for callers that only need
    the configuration or ``extra`` (a ``base`` model is hundreds of MB).

    Raises
    ------
    MissingInputError
        The file does not exist.
    BadDataError
        The file is not a readable checkpoint of this app.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"model checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as exc:  # truncated file, pickle with code, foreign format
        raise BadDataError(f"cannot read model checkpoint {path}: {exc}") from exc
    if not isinstance(ckpt, dict) or not {"model", "config", "geometry"} <= set(ckpt):
        raise BadDataError(f"{path} is not a bids_roimae checkpoint")
    return ckpt


def geometry_from_checkpoint(ckpt: dict) -> TokenGeometry:
    """The token geometry stored in a checkpoint dict."""
    arrays = {k: (v.numpy() if isinstance(v, torch.Tensor) else v)
              for k, v in ckpt["geometry"].items()}
    return TokenGeometry.from_arrays(arrays)


def model_from_checkpoint(path, device="cpu"):
    """Rebuild the pretrained model from a checkpoint alone (no CLI flags needed).

    Returns
    -------
    model : RoiMAE
        In eval mode, on ``device``.
    cfg : AppConfig
    geometry : TokenGeometry
    ckpt : dict
    """
    from bids_roimae.model.mae import build_model

    ckpt = load_checkpoint(path)
    cfg = AppConfig.from_dict(ckpt["config"])
    geometry = geometry_from_checkpoint(ckpt)
    model = build_model(cfg, geometry)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as exc:
        raise BadDataError(f"{path}: weights do not fit the stored configuration: {exc}") from exc
    return model.to(device).eval(), cfg, geometry, ckpt
