"""The models folder of OUTPUT_DIR: finding and picking a pretrained or fine-tuned model."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

from bids_roimae.errors import MissingInputError, UsageError
from bids_roimae.io.checkpoint import ModelKind, check_kind, checkpoint_file, read_model_info

log = logging.getLogger(__name__)

#: How each step finds its model, and what to run first when there is none.
_HOW = {"pretrain": ("pretrained", "group --mode pretrain"),
        "finetune": ("fine-tuned", "participant --mode finetune --target COLUMN")}


def models_dir(output_dir) -> Path:
    """``OUTPUT_DIR/models``."""
    return Path(output_dir) / "models"


def find_models(output_dir, kind: ModelKind) -> list[Path]:
    """Final checkpoints of ``kind`` under OUTPUT_DIR/models, sorted by folder name.

    Unreadable checkpoints are reported and skipped.
    """
    found = []
    for path in sorted(models_dir(output_dir).glob("*/model.pt")):
        try:
            meta = read_model_info(path)[2]
        except Exception as exc:  # noqa: BLE001 - unreadable checkpoint: say so, keep looking
            log.warning("ignoring unreadable model %s (%s)", path, " ".join(str(exc).split()))
            continue
        if meta.kind == kind:
            found.append(path)
    return found


def pick_model(output_dir, explicit: Optional[Path], kind: ModelKind, flag: str) -> Path:
    """The checkpoint given by ``flag``, else the only one of ``kind`` in OUTPUT_DIR/models.

    Raises
    ------
    MissingInputError
        No such model.
    UsageError
        Several candidates and no ``flag`` to choose one.
    BadDataError
        The model given by ``flag`` is of the other kind (the line names the right
        option), or unreadable; said before any run is prepared.
    """
    if explicit is not None:
        path = checkpoint_file(explicit)
        check_kind(path, read_model_info(path)[2], kind)
        return path
    found = find_models(output_dir, kind)
    what, step = _HOW[kind]
    if not found:
        raise MissingInputError(f"no {what} model in {models_dir(output_dir)}: run "
                                f"'{step}' first or pass {flag} PATH")
    if len(found) > 1:
        names = ", ".join(p.parent.name for p in found)
        raise UsageError(f"several models in {models_dir(output_dir)} ({names}): "
                         f"choose one with {flag} PATH")
    return found[0]
