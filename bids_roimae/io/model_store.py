"""The models in OUTPUT_DIR/models and what their checkpoints carry.

Finding and picking a pretrained or fine-tuned model, and, from a checkpoint: the atlas
it was trained with, the masked autoencoder for region fidelity, and the configuration
with its preprocessing (so prepared caches match). Used by
:mod:`bids_roimae.app.steps`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from bids_roimae.errors import MissingInputError, UsageError

if TYPE_CHECKING:
    from bids_roimae.app.context import RunContext

log = logging.getLogger("bids_roimae")


def find_models(output_dir: Path, kind: str) -> list[Path]:
    """Final checkpoints of ``kind`` ("pretrain" or "finetune") under OUTPUT_DIR/models."""
    from bids_roimae.io.checkpoint import load_checkpoint

    found = []
    for path in sorted((output_dir / "models").glob("*/model.pt")):
        try:
            extra = load_checkpoint(path, mmap=True).get("extra") or {}
        except Exception as exc:  # unreadable checkpoint: say so, keep looking
            log.warning("ignoring unreadable model %s (%s)", path, exc)
            continue
        if extra.get("kind", "pretrain") == kind:
            found.append(path)
    return found


def pick_model(ctx: RunContext, explicit: Optional[Path], kind: str, flag: str) -> Path:
    """The model given by ``flag``, else the only one of ``kind`` in OUTPUT_DIR/models."""
    if explicit is not None:
        return Path(explicit)
    found = find_models(ctx.output_dir, kind)
    if not found:
        what = "pretrained" if kind == "pretrain" else "fine-tuned"
        step = "group --mode pretrain" if kind == "pretrain" else \
            "participant --mode finetune --target COLUMN"
        raise MissingInputError(f"no {what} model in {ctx.output_dir / 'models'}: run "
                                f"'{step}' first or pass {flag} PATH")
    if len(found) > 1:
        names = ", ".join(p.parent.name for p in found)
        raise UsageError(f"several models in {ctx.output_dir / 'models'} ({names}): "
                         f"choose one with {flag} PATH")
    return found[0]


def with_prep(cfg, prep_cfg):
    """``cfg`` with the preprocessing a model was trained with (the cache must match)."""
    import copy

    out = copy.deepcopy(cfg)
    out.prep = copy.deepcopy(prep_cfg)
    return out


def atlas_from_extra(extra: dict):
    """The atlas a model was trained with (name and region table), from its checkpoint."""
    import pandas as pd
    from types import SimpleNamespace

    index = list(extra.get("index") or [])
    table = pd.DataFrame({"index": index,
                          "name": list(extra.get("names") or [f"region-{i}" for i in index]),
                          "system": list(extra.get("systems") or [""] * len(index))})
    return SimpleNamespace(name=str(extra.get("name") or "atlas"), table=table)


def pretrained_mae(ckpt_extra: dict, classifier, device):
    """The masked autoencoder for region fidelity: the pretrained checkpoint when it is
    still there, else the classifier's encoder when fine-tuning left it frozen."""
    from bids_roimae.io.checkpoint import model_from_checkpoint

    path = Path(str(ckpt_extra.get("pretrained", "")))
    if path.is_dir():
        path = path / "model.pt"
    if path.is_file():
        return model_from_checkpoint(path, device=device)[0]
    if ckpt_extra.get("strategy") != "full":
        return classifier.encoder
    log.warning("region fidelity skipped: the pretrained model %s is gone and full "
                "fine-tuning changed the encoder", path)
    return None


__all__ = ["find_models", "pick_model", "with_prep", "atlas_from_extra", "pretrained_mae"]
