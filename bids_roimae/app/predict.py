"""``participant --mode predict``: per subject a prediction, embedding, attribution and
fidelity maps, and the participant page."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import nibabel as nib
import numpy as np
import pandas as pd
import torch
from torch import nn

from bids_roimae.analysis.attribution import integrated_gradients
from bids_roimae.analysis.evaluation import CHANCE_WARNING, OutOfFoldSummary
from bids_roimae.analysis.fidelity import region_fidelity
from bids_roimae.app.common import exit_code_for, prepare, start_output, with_prep
from bids_roimae.app.context import RunContext
from bids_roimae.config import MODEL_RESOLUTION
from bids_roimae.core.geometry import describe_regions
from bids_roimae.errors import BadDataError
from bids_roimae.io.bids_names import derivative_path
from bids_roimae.io.checkpoint import FoldModel, LoadedModel, load_model
from bids_roimae.io.derivatives import write_sidecar, write_tsv
from bids_roimae.io.model_store import models_dir, pick_model
from bids_roimae.io.templates import load_template
from bids_roimae.reports.participant_report import build_participant_report
from bids_roimae.reports.run_derivatives import write_run_attribution, write_run_fidelity
from bids_roimae.training.finetune import subject_prediction
from bids_roimae.training.windows import embed_loaded, load_windows, window_starts

log = logging.getLogger("bids_roimae")


def _write_prediction(ctx: RunContext, subject: str, pred: dict, model_path: Path,
                      source: dict) -> None:
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
        "Model": str(model_path), "AttributionModel": source,
        "participant_id": "Participant",
        "predicted_label": "Predicted class (or value for regression)"})
    emb = derivative_path(ctx.output_dir, ents, suffix="embedding", extension=".tsv",
                          desc="predict")
    vec = pd.DataFrame([pred["embedding"]],
                       columns=[f"dim{i:04d}" for i in range(len(pred["embedding"]))])
    write_tsv(emb, vec)
    write_sidecar(emb, {
        "Description": "Subject embedding: the encoder's pooled output averaged over "
                       "windows", "Model": str(model_path), "Dimensions": len(vec.columns)})


def _pretrained_path(ctx: RunContext, recorded: Optional[str]) -> Optional[Path]:
    """The pretrained checkpoint a fine-tuned model names: where it was, else the folder
    of the same name in this OUTPUT_DIR/models (a copied output folder)."""
    if not recorded:
        return None
    path = Path(recorded)
    if not path.is_absolute():  # recorded relative to the models folder
        path = models_dir(ctx.output_dir) / path
    path = path / "model.pt" if path.is_dir() else path
    if path.is_file():
        return path
    name = path.parent.name if path.name == "model.pt" else path.name
    local = models_dir(ctx.output_dir) / name / "model.pt"
    return local if local.is_file() else None


def _fidelity_model(ctx: RunContext, finetuned: LoadedModel) -> Optional[nn.Module]:
    """The masked autoencoder for region fidelity: the pretrained checkpoint when it is
    still there, else the classifier's encoder when fine-tuning left it frozen."""
    path = _pretrained_path(ctx, finetuned.meta.pretrained)
    if path is not None:
        return load_model(path, ctx.device, kind="pretrain").model
    if finetuned.meta.strategy != "full":
        # A region readout wraps the autoencoder (ReadoutEncoder.mae).
        return getattr(finetuned.model.encoder, "mae", finetuned.model.encoder)
    log.warning("region fidelity skipped: the pretrained model %s is gone and full "
                "fine-tuning changed the encoder", finetuned.meta.pretrained)
    return None


def _attribution_source(subject: str, fold: Optional[FoldModel], trained: Sequence[str]
                        ) -> dict:
    """Which classifier predicted and attributed ``subject``, for the sidecars."""
    if fold is not None:
        return {"Source": f"cross-validation fold {fold.fold} (repeat 0)",
                "TrainedOnThisParticipant": False}
    seen = subject in set(trained)
    return {"Source": "model refit on all labelled participants",
            "TrainedOnThisParticipant": seen if trained else "unknown"}


@dataclass
class RunWindows:
    """One run's windows, read from the cache once, and which of them each analysis uses."""

    entry: object
    windows: np.ndarray  # (K, W, N, P) float32
    predict_rows: np.ndarray  # rows for the prediction (finetune.windows_per_run)
    attribution_rows: np.ndarray  # rows for IG and fidelity (attribution.windows)


def read_run_windows(entry, window: int, per_run_predict: int, per_run_attribution: int
                     ) -> Optional[RunWindows]:
    """The union of the prediction's and the attribution's windows of a run, in one read
    of the cache (None when the run is shorter than a window)."""
    n_frames = int(entry.n_frames)
    for_predict = window_starts(n_frames, window, per_run_predict)
    for_attribution = window_starts(n_frames, window, per_run_attribution)
    starts = np.union1d(for_predict, for_attribution)
    if starts.size == 0:
        return None
    windows = load_windows([(entry, int(s)) for s in starts], window)
    return RunWindows(entry, windows, np.searchsorted(starts, for_predict),
                      np.searchsorted(starts, for_attribution))


def run_predict(ctx: RunContext) -> int:
    """Per subject: prediction, embedding, attribution and fidelity maps, HTML page.

    The models are loaded once for all subjects; each run's windows are read from the
    cache once and serve the prediction, Integrated Gradients and region fidelity.
    """
    model_path = pick_model(ctx.output_dir, ctx.model_path, "finetune", "--model")
    finetuned = load_model(model_path, ctx.device, kind="finetune")
    classifier, cfg, geometry, meta = (finetuned.model, finetuned.cfg, finetuned.geometry,
                                       finetuned.meta)
    atlas = meta.atlas
    log.info("model geometry: %s", describe_regions(geometry, ids=list(atlas.index) or None))
    start_output(ctx)
    runs = ctx.discover()
    template = load_template(ctx.space, resolution=MODEL_RESOLUTION)
    entries, failures = prepare(ctx, runs, geometry, template,
                                with_prep(ctx.cfg, cfg.prep, cfg.geometry.window))
    mae = _fidelity_model(ctx, finetuned) if ctx.fidelity else None
    by_subject: dict[str, list] = {}
    for entry in entries:
        by_subject.setdefault(str(entry.subject), []).append(entry)
    model_meta = {"Checkpoint": str(model_path), "Name": model_path.parent.name,
                  "Preset": cfg.model.preset, "Strategy": meta.strategy,
                  "Target": meta.label_info.get("target")}
    window, attr = cfg.geometry.window, ctx.cfg.attribution
    if mae is not None:
        n_regions = len(geometry.region_patches())
        log.info("region fidelity: up to %d windows x %d regions per run on %s, batched "
                 "(--fidelity-windows, --fidelity-batch or --no-fidelity to change)",
                 attr.fidelity_windows, n_regions, ctx.device)
    evidence = OutOfFoldSummary.from_dict(meta.out_of_fold)
    if evidence is not None and not evidence.above_chance:
        log.warning("%s: %s %s", model_path.parent.name, evidence.headline(), CHANCE_WARNING)
    random_clf = classifier.with_random_head(ctx.cfg.seed) if ctx.randomised_check else None
    for subject, subj_entries in sorted(by_subject.items()):
        # Out-of-fold: a participant of the cross-validation is predicted and attributed
        # by the fold model that never trained on it.
        subject_clf, fold = finetuned.classifier_for(subject)
        subject_clf = subject_clf.to(ctx.device).eval()
        source = _attribution_source(subject, fold, meta.trained_subjects)
        subject_meta = dict(model_meta, AttributionModel=source)
        run_windows = [rw for rw in (read_run_windows(e, window, cfg.finetune.windows_per_run,
                                                      attr.windows) for e in subj_entries)
                       if rw is not None]
        if not run_windows:
            raise BadDataError(f"sub-{subject}: no run has {window} frames (one window)")
        for_predict = np.concatenate([rw.windows[rw.predict_rows] for rw in run_windows])
        embeddings = embed_loaded(subject_clf.encoder, for_predict, cfg.finetune.batch_size,
                                  ctx.device)
        logits = subject_clf.head_forward(torch.from_numpy(embeddings).to(ctx.device))
        pred = subject_prediction(subject_clf, logits.detach().float().cpu().numpy(),
                                  embeddings)
        _write_prediction(ctx, subject, pred, model_path, source)
        log.info("sub-%s: predicted %s (p=%s) from %d windows", subject, pred["label"],
                 None if pred["probability"] is None else f"{pred['probability']:.3f}",
                 pred["n_windows"])
        for rw in run_windows:
            entry, windows = rw.entry, rw.windows[rw.attribution_rows]
            ents = dict(entry.meta.get("entities") or {})
            reference = nib.load(str(entry.source))
            sources = [f"bids:fmriprep:{Path(entry.source).name}",
                       f"models/{model_path.parent.name}"]
            ig_settings = dict(steps=attr.steps, min_steps=attr.min_steps,
                               baseline=attr.baseline, batch_size=attr.batch_size)
            ig = integrated_gradients(subject_clf, windows, **ig_settings)
            randomised = None if random_clf is None else \
                integrated_gradients(random_clf, windows, **ig_settings)
            write_run_attribution(ctx.output_dir, ents, ig, geometry, reference, atlas.name,
                                  atlas.table, space=ctx.space, res=ents.get("res"),
                                  model_meta=subject_meta, sources=sources,
                                  randomised=randomised, evidence=evidence)
            if mae is not None:
                n_fid = min(len(windows), attr.fidelity_windows)
                some = windows[np.linspace(0, len(windows) - 1, n_fid).round().astype(int)]
                fid = region_fidelity(mae, some, geometry, table=atlas.table,
                                      batch_size=attr.fidelity_batch)
                write_run_fidelity(ctx.output_dir, ents, fid, geometry, reference, atlas.name,
                                   space=ctx.space, res=ents.get("res"),
                                   model_meta=model_meta, sources=sources)
        build_participant_report(ctx.output_dir, subject, template=template)
    return exit_code_for(failures)
