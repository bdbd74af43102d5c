"""The body of each (level, mode): prepare, pretrain, finetune, predict, report.

Each step reads what it needs through the stage modules and returns an exit code. Finding
and picking models in OUTPUT_DIR/models, and what their checkpoints carry, is in
:mod:`bids_roimae.io.model_store` (``find_models`` and ``pick_model`` are re-exported).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from bids_roimae.errors import EXIT_OK, MissingInputError
from bids_roimae.io.model_store import (atlas_from_extra, find_models, pick_model, pretrained_mae,
                              with_prep)
from bids_roimae.app.context import RunContext, exit_code_for

log = logging.getLogger("bids_roimae")


# -- shared pieces ---------------------------------------------------------------------
def _start_output(ctx: RunContext) -> None:
    from bids_roimae.io.discovery import find_derivatives
    from bids_roimae.io.derivatives import ensure_output_dir, write_bidsignore, write_dataset_description
    from bids_roimae.reports.run_derivatives import BIDSIGNORE

    ensure_output_dir(ctx.output_dir)
    fmriprep = find_derivatives(ctx.bids_dir, ctx.derivatives)
    sources = [ctx.bids_dir.as_uri()]
    if fmriprep.resolve() != ctx.bids_dir.resolve():
        sources.append(fmriprep.as_uri())
    write_dataset_description(ctx.output_dir, source_datasets=sources)
    # Non-schema outputs (3D statistical maps, region tables, figures, reports) are
    # listed so the dataset still passes the BIDS validator.
    write_bidsignore(ctx.output_dir, ["cache/", "models/", "logs/", "*.svg", "*.png",
                                      "*_predictions.*", "*_embedding.*"] + BIDSIGNORE)


def _template_geometry(ctx: RunContext, cfg, with_atlas: bool):
    """Template, atlas (or None) and the token geometry for the model grid."""
    from bids_roimae.io.atlas import load_atlas, resample_labels
    from bids_roimae.io.templates import load_template
    from bids_roimae.core.geometry import build_geometry, describe_regions

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
    from bids_roimae.io.preparation import prepare_runs

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
    from bids_roimae.io.derivatives import write_atlas_files
    from bids_roimae.training.pretrain import model_name, run_pretraining

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


# -- participant --mode finetune ---------------------------------------------------------
def _labelled_entries(ctx: RunContext, labels, geometry, prep_cfg):
    """Prepared runs (preparing what is missing) of the selected, labelled subjects."""
    from bids_roimae.io.templates import load_template

    labelled = set(labels.index)
    runs = [r for r in ctx.discover() if r.subject in labelled]
    if not runs:
        raise MissingInputError("none of the labelled participants has a BOLD run in "
                                f"{ctx.space} among the selected ones")
    template = load_template(ctx.space, resolution=2)
    return _prepare(ctx, runs, geometry, template, with_prep(ctx.cfg, prep_cfg))


def run_finetune(ctx: RunContext) -> int:
    """Fine-tune the pretrained encoder on a participants.tsv column, cross-validated."""
    from bids_roimae.io.discovery import read_participants
    from bids_roimae.io.checkpoint import load_checkpoint
    from bids_roimae.training.comparison import compare_masking
    from bids_roimae.training.finetune import pretrained_config, run_finetune as finetune
    from bids_roimae.analysis.labels import parse_groups, parse_labels

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
        strategies = {p: load_checkpoint(p, mmap=True)["config"]["masking"]["strategy"]
                      for p in paths}
        unique = len(set(strategies.values())) == len(strategies)
        for path, strategy in sorted(strategies.items(), key=lambda kv: kv[1] != "random"):
            # the reference (random) first, so differences read roi - random
            models[strategy if unique else path.parent.name] = path
    else:
        models = {"model": pick_model(ctx, o.get("pretrained"), "pretrain", "--pretrained")}
    pre_cfg, geometry = pretrained_config(next(iter(models.values())))
    entries, failures = _labelled_entries(ctx, labels, geometry, pre_cfg.prep)
    if o.get("compare_masking"):
        out_dir = ctx.output_dir / "models" / "masking_comparison"
        result = compare_masking(models, entries, labels, ctx.cfg, out_dir,
                                 device=ctx.device, groups=groups, label_info=info)
        table = result["table"]
        keep = [c for c in table.columns if c.startswith(("accuracy_", "roc_auc_"))]
        log.info("masking comparison (details in %s):\n%s", out_dir,
                 table.loc[["mean", "sd"], keep].round(3).to_string())
    else:
        result = finetune(entries, labels, models["model"], ctx.cfg, ctx.output_dir,
                          device=ctx.device, groups=groups, label_info=info)
        summary = ", ".join(f"{k} {v['mean']:.3f} ± {v['sd']:.3f}"
                            for k, v in result["metrics"].items())
        log.info("fine-tuned %s: %s", result["name"], summary)
    return exit_code_for(failures)


def _write_prediction(ctx: RunContext, subject: str, pred: dict, model_path: Path) -> None:
    import pandas as pd

    from bids_roimae.io.bids_names import derivative_path
    from bids_roimae.io.derivatives import write_sidecar, write_tsv

    ents = {"subject": subject}
    row = {"participant_id": f"sub-{subject}", "model": model_path.parent.name,
           "predicted_label": pred["label"], "prediction": pred["prediction"],
           "probability": pred["probability"], "n_windows": pred["n_windows"]}
    row.update({f"probability_{k}": v for k, v in pred["probabilities"].items()})
    tsv = derivative_path(ctx.output_dir, ents, suffix="predictions", extension=".tsv",
                          desc="predict")
    write_tsv(tsv, pd.DataFrame([row]))
    write_sidecar(tsv, {
        "Description": "Prediction of the fine-tuned model (mean of window logits)",
        "Model": str(model_path), "participant_id": "Participant",
        "predicted_label": "Predicted class (or value for regression)"})
    emb = derivative_path(ctx.output_dir, ents, suffix="embedding", extension=".tsv",
                          desc="predict")
    vec = pd.DataFrame([pred["embedding"]],
                       columns=[f"dim{i:04d}" for i in range(len(pred["embedding"]))])
    write_tsv(emb, vec)
    write_sidecar(emb, {
        "Description": "Subject embedding: the encoder's pooled output averaged over "
                       "windows", "Model": str(model_path), "Dimensions": len(vec.columns)})


def run_predict(ctx: RunContext) -> int:
    """Per subject: prediction, embedding, attribution and fidelity maps, HTML page."""
    import nibabel as nib

    from bids_roimae.io.templates import load_template
    from bids_roimae.analysis.attribution import integrated_gradients
    from bids_roimae.model.classifier import load_windows, subject_windows
    from bids_roimae.analysis.fidelity import region_fidelity
    from bids_roimae.training.finetune import checkpoint_file, load_finetuned, predict_subject
    from bids_roimae.reports.participant_report import build_participant_report
    from bids_roimae.reports.run_derivatives import write_run_attribution, write_run_fidelity

    o = ctx.options
    model_path = checkpoint_file(pick_model(ctx, o.get("model_path"), "finetune", "--model"))
    classifier, cfg, geometry, ckpt = load_finetuned(model_path, ctx.device)
    extra = ckpt.get("extra") or {}
    atlas = atlas_from_extra(extra)
    _start_output(ctx)
    runs = ctx.discover()
    template = load_template(ctx.space, resolution=2)
    entries, failures = _prepare(ctx, runs, geometry, template, with_prep(ctx.cfg, cfg.prep))
    mae = pretrained_mae(extra, classifier, ctx.device) if o.get("fidelity", True) else None
    by_subject: dict = {}
    for entry in entries:
        by_subject.setdefault(str(entry.subject), []).append(entry)
    model_meta = {"Checkpoint": str(model_path), "Name": model_path.parent.name,
                  "Preset": cfg.model.preset, "Strategy": extra.get("strategy"),
                  "Target": (extra.get("label_info") or {}).get("target")}
    window, attr = cfg.geometry.window, ctx.cfg.attribution
    if mae is not None:
        n_regions = len(geometry.region_patches())
        log.info("region fidelity: up to %d windows x %d regions = %d forward passes per run "
                 "on %s (--fidelity-windows or --no-fidelity to change)",
                 attr.fidelity_windows, n_regions, attr.fidelity_windows * n_regions,
                 ctx.device)
    for subject, subj_entries in sorted(by_subject.items()):
        pred = predict_subject(classifier, subj_entries, cfg, ctx.device)
        _write_prediction(ctx, subject, pred, model_path)
        log.info("sub-%s: predicted %s (p=%s) from %d windows", subject, pred["label"],
                 None if pred["probability"] is None else f"{pred['probability']:.3f}",
                 pred["n_windows"])
        for entry in subj_entries:
            refs = subject_windows([entry], window, attr.windows).get(subject)
            if not refs:
                continue
            windows = load_windows(refs, window)
            ents = dict(entry.meta.get("entities") or {})
            reference = nib.load(str(entry.source))
            sources = [f"bids:fmriprep:{Path(entry.source).name}",
                       f"models/{model_path.parent.name}"]
            ig = integrated_gradients(classifier, windows, steps=attr.steps,
                                      min_steps=attr.min_steps,
                                      baseline=attr.baseline, batch_size=attr.batch_size)
            write_run_attribution(ctx.output_dir, ents, ig, geometry, reference, atlas.name,
                                  atlas.table, space=ctx.space, res=ents.get("res"),
                                  model_meta=model_meta, sources=sources)
            if mae is not None:
                n_fid = min(len(windows), attr.fidelity_windows)
                some = windows[np.linspace(0, len(windows) - 1, n_fid).round().astype(int)]
                fid = region_fidelity(mae, some, geometry, table=atlas.table,
                                      batch_size=attr.batch_size)
                write_run_fidelity(ctx.output_dir, ents, fid, geometry, reference, atlas.name,
                                   space=ctx.space, res=ents.get("res"),
                                   model_meta=model_meta, sources=sources)
        build_participant_report(ctx.output_dir, subject, template=template)
    return exit_code_for(failures)


def _report_groups(ctx: RunContext, participants, target: str, label_info: dict):
    """Add a ``group`` column to ``participants`` with the classes the model was trained
    on (e.g. ADHD-200 codes 1, 2, 3 -> positive, 0 -> negative); returns its name."""
    import pandas as pd

    from bids_roimae.errors import AppError
    from bids_roimae.analysis.labels import parse_labels

    positive = list(ctx.options.get("positive") or label_info.get("positive") or [])
    task = label_info.get("task_type") or ctx.cfg.finetune.task_type
    if task == "regression":
        return None  # group differences need groups
    try:
        labels, info = parse_labels(participants, target, positive or None, task)
    except AppError as exc:  # the report still works without group differences
        log.warning("no group differences in the report: %s", exc)
        return None
    classes = list(info.get("classes") or [])
    if task == "binary" and info.get("positive"):
        classes = [f"{target}={'/'.join(info['negative'])}",
                   f"{target}={'/'.join(info['positive'])}"]
    groups = labels.map(lambda v: classes[int(v)] if classes else v)
    # The trained classes' order: the negative (reference) class first, so group
    # differences read as positive minus negative.
    participants["group"] = (pd.Categorical(groups, categories=classes) if classes
                             else groups)
    return "group"


def run_report(ctx: RunContext) -> int:
    """Group summary of the attribution and fidelity outputs, with figures and HTML."""
    from bids_roimae.io.templates import load_template
    from bids_roimae.io.discovery import read_participants
    from bids_roimae.io.checkpoint import load_checkpoint
    from bids_roimae.reports.group_report import build_group_report

    _start_output(ctx)
    models = find_models(ctx.output_dir, "finetune") or find_models(ctx.output_dir,
                                                                    "pretrain")
    if not models:
        raise MissingInputError(f"nothing to report in {ctx.output_dir}: run pretraining, "
                                "fine-tuning and 'participant --mode predict' first")
    extra = load_checkpoint(models[0], mmap=True).get("extra") or {}
    label_info = extra.get("label_info") or {}
    target = ctx.options.get("target") or label_info.get("target")
    try:
        participants = read_participants(ctx.bids_dir)
    except MissingInputError:
        participants = None
    label_column = None
    if participants is not None and target:
        label_column = _report_groups(ctx, participants, target, label_info)
    template = load_template(ctx.space, resolution=2)
    out = build_group_report(ctx.output_dir, participants, atlas_from_extra(extra), template,
                             label_column=label_column,
                             subjects=ctx.participant_labels or None)
    log.info("group report: %s", out["html"])
    return EXIT_OK


__all__ = ["run_prepare", "run_pretrain", "run_finetune", "run_predict", "run_report",
           "find_models", "pick_model", "EXIT_OK"]
