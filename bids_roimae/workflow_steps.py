"""The body of each (level, mode): prepare, pretrain, finetune, predict, report.

Each step reads what it needs through the stage modules and returns an exit code.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import numpy as np

from .errors import EXIT_OK, MissingInputError, UsageError
from .workflows import RunContext, exit_code_for

log = logging.getLogger("bids_roimae")


# -- shared pieces ---------------------------------------------------------------------
def _start_output(ctx: RunContext) -> None:
    from .bids import find_derivatives
    from .outputs import ensure_output_dir, write_bidsignore, write_dataset_description

    ensure_output_dir(ctx.output_dir)
    fmriprep = find_derivatives(ctx.bids_dir, ctx.derivatives)
    sources = [ctx.bids_dir.as_uri()]
    if fmriprep.resolve() != ctx.bids_dir.resolve():
        sources.append(fmriprep.as_uri())
    write_dataset_description(ctx.output_dir, source_datasets=sources)
    # Non-schema outputs (3D statistical maps, region tables, figures, reports) are
    # listed so the dataset still passes the BIDS validator.
    write_bidsignore(ctx.output_dir, ["cache/", "models/", "logs/", "figures/", "*.html",
                                      "*_boldmap.*", "*_stat-*", "*.svg", "*.png",
                                      "*_predictions.*"])


def _template_geometry(ctx: RunContext, cfg, with_atlas: bool):
    """Template, atlas (or None) and the token geometry for the model grid."""
    from .atlas import load_atlas, load_template, resample_labels
    from .geometry import build_geometry, describe_regions

    template = load_template(ctx.space, resolution=2)
    mask = np.asanyarray(template.mask_img.dataobj) > 0
    atlas, labels = None, None
    if with_atlas:
        atlas = load_atlas(ctx.atlas, desc=ctx.atlas_desc, atlas_file=ctx.atlas_file,
                           labels_file=ctx.atlas_labels, space=ctx.space)
        labels, _vanished = resample_labels(atlas, template.mask_img)
    g = cfg.geometry
    geometry = build_geometry(mask, template.mask_img.affine, labels, g.patch_size,
                              g.roi_assign, g.min_brain_fraction)
    if atlas is not None:
        log.info("%s: %s", atlas.name, describe_regions(
            geometry, ids=list(atlas.table["index"])))
    return template, atlas, labels, geometry


def _prepare(ctx: RunContext, runs, geometry, template, cfg):
    from .data import prepare_runs

    entries, failures = prepare_runs(runs, geometry, template.mask_img, cfg.prep,
                                     ctx.output_dir, window=cfg.geometry.window,
                                     nprocs=ctx.nprocs, work_dir=ctx.work_dir,
                                     space=ctx.space)
    if failures:
        log.warning("%d of %d runs were skipped (see the errors above)", len(failures),
                    len(runs))
    return entries, failures


def _atlas_meta(atlas, geometry) -> dict:
    table = atlas.table
    return {
        "name": atlas.name, "desc": atlas.desc, "source": str(atlas.source),
        "hash": geometry.atlas_hash,
        "index": [int(v) for v in table["index"]],
        "names": [str(v) for v in table["name"]],
        "systems": [str(v) for v in table.get("system", [""] * len(table))],
    }


# -- participant --mode prepare ----------------------------------------------------------
def run_prepare(ctx: RunContext) -> int:
    """Index the selected subjects' BOLD runs and write their model-ready token caches."""
    runs = ctx.discover()
    _start_output(ctx)
    template, _, _, geometry = _template_geometry(ctx, ctx.cfg, with_atlas=False)
    log.info("%d BOLD runs selected; %d brain tokens of %d^3 voxels per frame", len(runs),
             geometry.n_tokens, geometry.patch_size)
    entries, failures = _prepare(ctx, runs, geometry, template, ctx.cfg)
    log.info("prepared %d runs into %s", len(entries), ctx.output_dir / "cache")
    return exit_code_for(failures)


# -- group --mode pretrain ------------------------------------------------------------------
def run_pretrain(ctx: RunContext) -> int:
    """Pretrain the ROI-guided (or random) masked autoencoder on every selected subject."""
    from .outputs import write_atlas_files
    from .train import model_name, run_pretraining

    runs = ctx.discover()
    _start_output(ctx)
    template, atlas, labels, geometry = _template_geometry(ctx, ctx.cfg, with_atlas=True)
    entries, failures = _prepare(ctx, runs, geometry, template, ctx.cfg)
    if not entries:
        raise MissingInputError("no usable BOLD run to pretrain on (all were skipped)")
    import nibabel as nib

    labels_img = nib.Nifti1Image(labels.astype(np.int16), template.mask_img.affine)
    write_atlas_files(ctx.output_dir, atlas.name, labels_img, atlas.table, ctx.space, 2)
    name = ctx.options.get("model_name") or model_name(ctx.cfg)
    model_dir = ctx.output_dir / "models" / name
    ckpt = run_pretraining(entries, geometry, ctx.cfg, model_dir, device=ctx.device,
                           resume=bool(ctx.options.get("resume", True)),
                           atlas_meta=_atlas_meta(atlas, geometry))
    log.info("pretrained model: %s", ckpt)
    return exit_code_for(failures)


# -- models found in the output folder ---------------------------------------------------
def find_models(output_dir: Path, kind: str) -> list[Path]:
    """Final checkpoints of ``kind`` ("pretrain" or "finetune") under OUTPUT_DIR/models."""
    from .checkpoint import load_checkpoint

    found = []
    for path in sorted((output_dir / "models").glob("*/model.pt")):
        try:
            extra = load_checkpoint(path).get("extra") or {}
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


def _labelled_entries(ctx: RunContext, labels, geometry, prep_cfg):
    """Prepared runs (preparing what is missing) of the selected, labelled subjects."""
    from .atlas import load_template

    runs = [r for r in ctx.discover() if r.subject in set(labels.index)]
    if not runs:
        raise MissingInputError("none of the labelled participants has a BOLD run in "
                                f"{ctx.space} among the selected ones")
    template = load_template(ctx.space, resolution=2)
    return _prepare(ctx, runs, geometry, template, _with_prep(ctx.cfg, prep_cfg))


def _with_prep(cfg, prep_cfg):
    """``cfg`` with the preprocessing a model was trained with (the cache must match)."""
    import copy

    out = copy.deepcopy(cfg)
    out.prep = copy.deepcopy(prep_cfg)
    return out


def run_finetune(ctx: RunContext) -> int:
    """Fine-tune the pretrained encoder on a participants.tsv column, cross-validated."""
    from .bids import read_participants
    from .comparison import compare_masking
    from .finetune import load_pretrained, run_finetune as finetune
    from .labels import parse_groups, parse_labels

    o = ctx.options
    _start_output(ctx)
    participants = read_participants(ctx.bids_dir)
    if ctx.participant_labels:
        participants = participants[participants.index.isin(ctx.participant_labels)]
    labels, info = parse_labels(participants, o["target"], list(o.get("positive") or []),
                                ctx.cfg.finetune.task_type)
    groups = parse_groups(participants, o["cv_group"])[0] if o.get("cv_group") else None
    if o.get("compare_masking"):
        paths = find_models(ctx.output_dir, "pretrain")
        if len(paths) < 2:
            raise MissingInputError(
                "--compare-masking needs two pretrained models in "
                f"{ctx.output_dir / 'models'} (run 'group --masking roi' and "
                "'group --masking random')")
        models = {}
        for path in paths:  # reference (random) first, so differences read roi - random
            _, pre_cfg, _, _ = load_pretrained(path)
            models[f"{pre_cfg.masking.strategy}:{path.parent.name}"] = path
        models = dict(sorted(models.items(), key=lambda kv: not kv[0].startswith("random")))
    else:
        models = {"model": pick_model(ctx, o.get("pretrained"), "pretrain", "--pretrained")}
    _, pre_cfg, geometry, _ = load_pretrained(next(iter(models.values())))
    entries, failures = _labelled_entries(ctx, labels, geometry, pre_cfg.prep)
    if o.get("compare_masking"):
        out_dir = ctx.output_dir / "models" / "masking_comparison"
        result = compare_masking(models, entries, labels, ctx.cfg, out_dir,
                                 device=ctx.device, groups=groups, label_info=info)
        log.info("masking comparison written to %s", out_dir)
        log.info("\n%s", result["table"].to_string())
    else:
        result = finetune(entries, labels, models["model"], ctx.cfg, ctx.output_dir,
                          device=ctx.device, groups=groups, label_info=info)
        summary = ", ".join(f"{k} {v['mean']:.3f} ± {v['sd']:.3f}"
                            for k, v in result["metrics"].items())
        log.info("fine-tuned %s: %s", result["name"], summary)
    return exit_code_for(failures)


def run_predict(ctx: RunContext) -> int:  # filled in with the prediction stage
    raise UsageError("--mode predict is not available in this version")


def run_report(ctx: RunContext) -> int:  # filled in with the report stage
    raise UsageError("--mode report is not available in this version")


__all__ = ["run_prepare", "run_pretrain", "run_finetune", "run_predict", "run_report",
           "find_models", "pick_model", "EXIT_OK"]
