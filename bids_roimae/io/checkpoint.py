"""Atomic checkpoints: weights + configuration + token geometry + versions.

A checkpoint is a plain dict saved with ``torch.save`` and loadable with
``torch.load(weights_only=True)`` (only tensors, numbers, strings, lists and dicts), so a
shared model file cannot run code on load. Keys:

``model`` (state_dict), ``config`` (``AppConfig.to_dict()``), ``geometry``
(``TokenGeometry.to_arrays()`` with arrays as tensors), ``step``, ``optimizer``,
``scheduler``, ``rng`` (torch CPU/CUDA generator states), ``versions`` and ``extra``:
what :class:`ModelMeta` holds (kind, atlas, labels, head, fine-tuning strategy), stored
as flat plain values so checkpoints written before the dataclass existed still load.

:func:`load_model` rebuilds a pretrained autoencoder or a fine-tuned classifier from the
file alone; :func:`read_model_info` gives its configuration, geometry and metadata
without building it.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import numpy as np
import pandas as pd
import torch
from torch import nn

from bids_roimae import __version__
from bids_roimae.config import AppConfig
from bids_roimae.core.geometry import TokenGeometry
from bids_roimae.errors import BadDataError, MissingInputError, OutputError
from bids_roimae.io import atomic
from bids_roimae.model.classifier import Classifier, build_head
from bids_roimae.model.mae import build_model
from bids_roimae.model.readout import build_readout

ModelKind = Literal["pretrain", "finetune"]


@dataclass(frozen=True)
class AtlasMeta:
    """The atlas a model was trained with: its name and region table."""

    name: str = "atlas"
    desc: Optional[str] = None
    source: str = ""
    hash: str = ""
    index: tuple[int, ...] = ()
    names: tuple[str, ...] = ()
    systems: tuple[str, ...] = ()

    @property
    def table(self) -> pd.DataFrame:
        """Columns ``index``, ``name``, ``system`` (as :class:`~bids_roimae.io.atlas.Atlas`)."""
        index = list(self.index)
        return pd.DataFrame({"index": index,
                             "name": list(self.names) or [f"region-{i}" for i in index],
                             "system": list(self.systems) or [""] * len(index)})

    @classmethod
    def from_table(cls, name: str, table: pd.DataFrame, *, desc: Optional[str] = None,
                   source: str = "", atlas_hash: str = "") -> "AtlasMeta":
        """From an atlas region table (``index``, ``name``[, ``system``])."""
        return cls(name=str(name), desc=desc, source=str(source), hash=str(atlas_hash),
                   index=tuple(int(v) for v in table["index"]),
                   names=tuple(str(v) for v in table["name"]),
                   systems=tuple(str(v) for v in table.get("system", [""] * len(table))))


@dataclass(frozen=True)
class HeadSpec:
    """The classifier head of a fine-tuned model."""

    kind: str
    embed_dim: int
    n_outputs: int


@dataclass(frozen=True)
class ModelMeta:
    """What a checkpoint says about its model beyond weights, configuration and geometry.

    ``kind`` is ``"pretrain"`` (the masked autoencoder) or ``"finetune"`` (a classifier
    with ``head``, ``label_info``, ``strategy`` and the ``pretrained`` model it started
    from, a name relative to the models folder or a path).
    """

    kind: ModelKind = "pretrain"
    atlas: AtlasMeta = field(default_factory=AtlasMeta)
    label_info: dict = field(default_factory=dict)
    head: Optional[HeadSpec] = None
    strategy: Optional[str] = None
    pretrained: Optional[str] = None
    pretrained_kind: Optional[str] = None
    cv_metrics: dict = field(default_factory=dict)

    def to_extra(self) -> dict:
        """The flat plain mapping stored under the checkpoint's ``extra``."""
        a = self.atlas
        extra = {"kind": self.kind, "name": a.name, "desc": a.desc, "source": a.source,
                 "hash": a.hash, "index": list(a.index), "names": list(a.names),
                 "systems": list(a.systems)}
        if self.kind == "finetune":
            extra.update(label_info=dict(self.label_info), strategy=self.strategy,
                         pretrained=self.pretrained, pretrained_kind=self.pretrained_kind,
                         cv_metrics=dict(self.cv_metrics),
                         head=None if self.head is None else vars(self.head).copy())
        return extra

    @classmethod
    def from_extra(cls, extra: Optional[dict]) -> "ModelMeta":
        """Read a checkpoint's ``extra`` (keys it does not know are ignored)."""
        extra = dict(extra or {})
        atlas = AtlasMeta(name=str(extra.get("name") or "atlas"), desc=extra.get("desc"),
                          source=str(extra.get("source") or ""),
                          hash=str(extra.get("hash") or ""),
                          index=tuple(int(v) for v in extra.get("index") or ()),
                          names=tuple(str(v) for v in extra.get("names") or ()),
                          systems=tuple(str(v) for v in extra.get("systems") or ()))
        head = extra.get("head")
        return cls(kind="finetune" if extra.get("kind") == "finetune" else "pretrain",
                   atlas=atlas, label_info=dict(extra.get("label_info") or {}),
                   head=HeadSpec(str(head["kind"]), int(head["embed_dim"]),
                                 int(head["n_outputs"])) if head else None,
                   strategy=extra.get("strategy"), pretrained=extra.get("pretrained"),
                   pretrained_kind=extra.get("pretrained_kind"),
                   cv_metrics=dict(extra.get("cv_metrics") or {}))


@dataclass
class LoadedModel:
    """A model rebuilt from its checkpoint alone (no CLI flags needed)."""

    model: nn.Module  # RoiMAE (pretrain) or Classifier (finetune), eval mode
    cfg: AppConfig
    geometry: TokenGeometry
    meta: ModelMeta
    path: Path


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
    return {"bids_roimae": str(__version__), "torch": str(torch.__version__),
            "numpy": str(np.__version__), "python": platform.python_version()}


def rng_states() -> dict:
    """Torch generator states (CPU and, when present, every CUDA device)."""
    states = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = list(torch.cuda.get_rng_state_all())
    return states


def save_checkpoint(path, *, model: nn.Module, cfg: AppConfig, geometry: TokenGeometry,
                    meta: ModelMeta, step: int = 0, optimizer=None, scheduler=None) -> Path:
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
    meta : ModelMeta
        Kind, atlas and (fine-tuned models) head and labels.
    optimizer : torch.optim.Optimizer, optional
    scheduler : object with ``state_dict()`` or a plain dict, optional

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
        "extra": _to_plain(meta.to_extra()),
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


def checkpoint_file(path) -> Path:
    """``path``, or ``path/model.pt`` for a model folder; MissingInputError if absent."""
    path = Path(path)
    if path.is_dir():
        path = path / "model.pt"
    if not path.is_file():
        raise MissingInputError(f"model checkpoint not found: {path}")
    return path


def read_model_info(path) -> tuple[AppConfig, TokenGeometry, ModelMeta]:
    """Configuration, geometry and metadata of a saved model, without building it."""
    ckpt = load_checkpoint(checkpoint_file(path), mmap=True)
    return (AppConfig.from_dict(ckpt["config"]), geometry_from_checkpoint(ckpt),
            ModelMeta.from_extra(ckpt.get("extra")))


_HINT = {"pretrain": "it is a pretrained model: pass it with --pretrained",
         "finetune": "it is a fine-tuned model: pass it with --model"}


def load_model(path, device="cpu", *, kind: Optional[ModelKind] = None) -> LoadedModel:
    """Rebuild a pretrained autoencoder or a fine-tuned classifier from its checkpoint.

    Parameters
    ----------
    path : path
        ``model.pt`` or the model's folder.
    device : str or torch.device
    kind : {"pretrain", "finetune"}, optional
        The kind the caller needs; another kind is refused with a message saying which
        option takes it.

    Returns
    -------
    LoadedModel
        The model in eval mode on ``device`` with its configuration, geometry and meta.

    Raises
    ------
    MissingInputError, BadDataError
    """
    path = checkpoint_file(path)
    ckpt = load_checkpoint(path)
    meta = ModelMeta.from_extra(ckpt.get("extra"))
    if kind is not None and meta.kind != kind:
        raise BadDataError(f"{path} is not a {'fine-tuned' if kind == 'finetune' else 'pretrained'}"
                           f" model: {_HINT[meta.kind]}")
    cfg = AppConfig.from_dict(ckpt["config"])
    geometry = geometry_from_checkpoint(ckpt)
    model = build_model(cfg, geometry)
    if meta.kind == "finetune":
        if meta.head is None:
            raise BadDataError(f"{path}: a fine-tuned model without its head description")
        # Region readouts wrap the autoencoder (keys ``encoder.mae.*``); checkpoints from
        # before readouts existed hold the plain mean readout whatever the config default.
        wrapped = any(k.startswith("encoder.mae.") for k in ckpt["model"])
        readout = cfg.finetune.readout if wrapped else "mean"
        model = Classifier(build_readout(model, readout, geometry),
                           build_head(meta.head.kind, meta.head.embed_dim,
                                             meta.head.n_outputs),
                           meta.head.embed_dim, label_info=meta.label_info)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as exc:
        raise BadDataError(f"{path}: weights do not fit the stored configuration "
                           f"({' '.join(str(exc).split())[:200]})") from exc
    return LoadedModel(model.to(device).eval(), cfg, geometry, meta, path)
