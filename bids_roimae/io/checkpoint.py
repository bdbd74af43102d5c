"""Atomic checkpoints: weights + configuration + token geometry + versions.

A checkpoint is a plain dict saved with ``torch.save`` and loadable with
``torch.load(weights_only=True)`` (only tensors, numbers, strings, lists and dicts), so a
shared model file cannot run code on load. Keys:

``model`` (state_dict), ``config`` (``AppConfig.to_dict()``), ``geometry``
(``TokenGeometry.to_arrays()`` with arrays as tensors), ``step``, ``optimizer``,
``scheduler``, ``rng`` (torch CPU/CUDA generator states), ``versions`` and ``extra``:
what :class:`ModelMeta` holds (kind, atlas, labels, head, fine-tuning strategy), stored
as flat plain values so checkpoints written before the dataclass existed still load.
Fine-tuned models with a frozen encoder also keep ``fold_heads``: each cross-validation
fold's head and standardisation with the subjects it was tested on, so attribution of a
subject in the cross-validation uses the model that never trained on it
(:meth:`LoadedModel.classifier_for`).

:func:`load_model` rebuilds a pretrained autoencoder or a fine-tuned classifier from the
file alone; :func:`read_model_info` gives its configuration, geometry and metadata
without building it.
"""

from __future__ import annotations

import platform
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from bids_roimae import __version__
from bids_roimae.config import AppConfig
from bids_roimae.core.geometry import RULES, TokenGeometry
from bids_roimae.errors import BadDataError, MissingInputError, OutputError, one_line
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
    #: Out-of-fold accuracy/AUC with intervals (``OutOfFoldSummary.to_dict()``).
    out_of_fold: dict = field(default_factory=dict)
    #: Participants the stored (refit) model was trained on.
    trained_subjects: tuple[str, ...] = ()

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
                         out_of_fold=dict(self.out_of_fold),
                         trained_subjects=list(self.trained_subjects),
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
                   cv_metrics=dict(extra.get("cv_metrics") or {}),
                   out_of_fold=dict(extra.get("out_of_fold") or {}),
                   trained_subjects=tuple(str(s) for s in extra.get("trained_subjects") or ()))


@dataclass(frozen=True)
class FoldModel:
    """One cross-validation fold's classifier and the participants it was tested on
    (never trained on)."""

    fold: int
    test_subjects: frozenset
    classifier: nn.Module


@dataclass
class LoadedModel:
    """A model rebuilt from its checkpoint alone (no CLI flags needed)."""

    model: nn.Module  # RoiMAE (pretrain) or Classifier (finetune), eval mode
    cfg: AppConfig
    geometry: TokenGeometry
    meta: ModelMeta
    path: Path
    fold_models: tuple[FoldModel, ...] = ()

    def classifier_for(self, subject: str) -> tuple[nn.Module, Optional[FoldModel]]:
        """The classifier that should predict and attribute ``subject``.

        A participant of the cross-validation gets the fold model that was tested on it
        (so its map is out-of-fold); anyone else gets the refit model, with ``None`` as
        the fold.
        """
        subject = str(subject).removeprefix("sub-")
        for fold in self.fold_models:
            if subject in fold.test_subjects:
                return fold.classifier, fold
        return self.model, None


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
                    meta: ModelMeta, step: int = 0, optimizer=None, scheduler=None,
                    fold_models: Sequence[tuple[Sequence[str], nn.Module]] = ()) -> Path:
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
    fold_models : sequence of (test subjects, Classifier)
        Cross-validation fold classifiers that share ``model``'s frozen encoder; only
        their heads and standardisation are stored.

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
        "fold_heads": [{"test_subjects": [str(s) for s in subjects],
                        "state": {k: v for k, v in unwrap_model(clf).state_dict().items()
                                  if not k.startswith("encoder.")}}
                       for subjects, clf in fold_models],
    }
    needed = _tensor_bytes(payload) + 2 ** 20  # tensors dominate; 1 MB for the rest

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            # Reserve the space first: a full disk fails here with ENOSPC, before any
            # byte of the checkpoint is written; the excess is cut off below.
            atomic.preallocate(tmp, needed)
            torch.save(payload, fh)
            fh.truncate(fh.tell())

    try:
        atomic.write_via(path, write, fsync=False)
    except OSError as exc:
        reason = exc.strerror if exc.strerror and exc.filename is None else one_line(exc)
        raise OutputError(f"cannot write checkpoint {path}: {reason}") from exc
    except RuntimeError as exc:  # torch's zip writer reports a failed write this way
        if not _is_write_failure(exc, path.parent, needed):
            raise
        raise OutputError(f"cannot write checkpoint {path}: "
                          f"{atomic.no_space_error(path.parent, needed).strerror} "
                          f"({one_line(exc)[:120]})") from exc
    return path


def _is_write_failure(exc: RuntimeError, folder: Path, needed: int) -> bool:
    """Whether torch's ``RuntimeError`` is a failed write (its zip writer says "unexpected
    pos ..." or "PytorchStreamWriter failed writing ..." when the disk fills up)."""
    text = str(exc)
    if any(w in text for w in ("inline_container", "PytorchStreamWriter", "write")):
        return True
    if isinstance(exc.__context__, OSError):
        return True
    try:
        return shutil.disk_usage(folder).free < needed
    except OSError:
        return False


def _tensor_bytes(value: Any) -> int:
    """Bytes of the tensors inside a nested payload (the bulk of a checkpoint)."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(_tensor_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_tensor_bytes(v) for v in value)
    return 0


def checkpoint_problem(path) -> Optional[str]:
    """Why the checkpoint at ``path`` cannot be read (one line), or ``None`` when it can.

    Reads it memory-mapped, so the check costs little even for a large model.
    """
    try:
        load_checkpoint(path, mmap=True)
    except (BadDataError, MissingInputError) as exc:
        return one_line(exc)
    return None


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
        raise BadDataError(f"cannot read model checkpoint {path}: "
                           f"{one_line(exc)[:200]}") from exc
    if not isinstance(ckpt, dict) or not {"model", "config", "geometry"} <= set(ckpt):
        raise BadDataError(f"{path} is not a bids_roimae checkpoint")
    return ckpt


def geometry_from_checkpoint(ckpt: dict) -> TokenGeometry:
    """The token geometry stored in a checkpoint dict.

    Its ``rule`` says what a token is: checkpoints written before region-split tokens
    existed carry a one-token-per-patch rule (``majority``) and load with it unchanged
    (their masking, fidelity and region tables use patch-majority regions); a rule this
    version does not know is refused.

    Raises
    ------
    BadDataError
        The stored geometry is incomplete or has an unknown rule.
    """
    arrays = {k: (v.numpy() if isinstance(v, torch.Tensor) else v)
              for k, v in ckpt["geometry"].items()}
    rule = str(arrays.get("rule", ""))
    if rule not in RULES:
        raise BadDataError(f"the checkpoint's token geometry has region rule {rule!r}, which "
                           f"this version of bids_roimae does not know (known: "
                           f"{', '.join(RULES)}); use the version that wrote it")
    try:
        return TokenGeometry.from_arrays(arrays)
    except (KeyError, ValueError) as exc:
        raise BadDataError(f"the checkpoint's token geometry is unreadable: {exc}") from exc


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


def check_kind(path, meta: ModelMeta, kind: Optional[ModelKind]) -> None:
    """Refuse a model of another kind than ``kind`` with a line naming the right option.

    Raises
    ------
    BadDataError
        ``meta.kind`` differs from ``kind`` (``None`` accepts both).
    """
    if kind is not None and meta.kind != kind:
        wanted = "fine-tuned" if kind == "finetune" else "pretrained"
        raise BadDataError(f"{path} is not a {wanted} model: {_HINT[meta.kind]}")


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
    check_kind(path, meta, kind)
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
        folds = tuple(_fold_model(k, fold, model, meta)
                      for k, fold in enumerate(ckpt.get("fold_heads") or ()))
    except RuntimeError as exc:
        raise BadDataError(f"{path}: weights do not fit the stored configuration "
                           f"({' '.join(str(exc).split())[:200]})") from exc
    return LoadedModel(model.to(device).eval(), cfg, geometry, meta, path,
                       tuple(FoldModel(f.fold, f.test_subjects, f.classifier.to(device).eval())
                             for f in folds))


def _fold_model(k: int, stored: dict, refit: Classifier, meta: ModelMeta) -> FoldModel:
    """A fold's classifier: the refit model's (shared, frozen) encoder with its own head."""
    head = meta.head
    clf = Classifier(refit.encoder, build_head(head.kind, head.embed_dim, head.n_outputs),
                     head.embed_dim, label_info=meta.label_info)
    result = clf.load_state_dict(stored["state"], strict=False)
    missing = [k for k in result.missing_keys if not k.startswith("encoder.")]
    if missing or result.unexpected_keys:
        raise RuntimeError(f"fold {k}: missing {missing}, unexpected {result.unexpected_keys}")
    return FoldModel(k, frozenset(str(s) for s in stored["test_subjects"]), clf)
