"""Group-level pretraining of the masked autoencoder over cached brain tokens.

``run_pretraining`` trains on windows of every training subject's runs, validates on
held-out subjects, logs to ``log.tsv`` (and a progress bar on a terminal), checkpoints
atomically, resumes after a kill with bit-identical results on CPU, and runs under
``torchrun`` (DDP) when the environment says so.

Files in ``model_dir``: ``checkpoint.pt`` (latest, with optimiser state),
``model.pt`` (final weights), ``log.tsv``, ``loss.png``, ``summary.json``.

The step count, learning-rate schedule and weight-decay groups are in
:mod:`bids_roimae.training.schedule`; ``log.tsv`` and the loss plot in
:mod:`bids_roimae.training.log`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from bids_roimae import interrupt
from bids_roimae.config import AppConfig
from bids_roimae.core.masking import region_groups
from bids_roimae.errors import AppError, BadDataError, Terminated, UsageError
from bids_roimae.io.atomic import remove_dead_temps
from bids_roimae.io.checkpoint import (
    AtlasMeta,
    ModelMeta,
    checkpoint_problem,
    geometry_from_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from bids_roimae.model.mae import build_model, count_parameters, resolve_model_config
from bids_roimae.training.distributed import DistContext, setup_distributed
from bids_roimae.training.log import TrainLog, plot_loss
from bids_roimae.training.recon_skill import SkillSums, skill_sums, token_regions
from bids_roimae.training.sampling import (
    Prefetcher,
    TokenFeed,
    fixed_plan,
    split_subjects,
    step_plan,
    window_index,
)
from bids_roimae.training.schedule import lr_at, param_groups, peak_lr, total_steps

log = logging.getLogger(__name__)

# Settings that do not change the trained weights: a resume may differ in these.
_RESUME_FREE = {("train", k) for k in ("checkpoint_every", "log_every", "compile",
                                       "num_workers", "gpu_resident", "val_batches")}


def model_name(cfg: AppConfig) -> str:
    """Folder name of a pretrained model, e.g. ``roimae_mask-roi_preset-tiny_ps-6``."""
    return (f"roimae_mask-{cfg.masking.strategy}_preset-{cfg.model.preset}"
            f"_ps-{cfg.geometry.patch_size}")


def config_differences(saved: dict, current: dict) -> list[str]:
    """Settings that differ between two ``AppConfig.to_dict()`` (weight-relevant only)."""
    diffs = []
    for section, values in current.items():
        if section == "finetune":
            continue
        if not isinstance(values, dict):
            if saved.get(section) != values:
                diffs.append(f"{section}: {saved.get(section)!r} -> {values!r}")
            continue
        old = saved.get(section) or {}
        for key, value in values.items():
            if (section, key) not in _RESUME_FREE and old.get(key) != value:
                diffs.append(f"{section}.{key}: {old.get(key)!r} -> {value!r}")
    return diffs


def _use_resident(cfg: AppConfig, device: torch.device, entries) -> bool:
    mode = cfg.train.gpu_resident
    if device.type != "cuda" or mode == "never":
        return False
    if mode == "always":
        return True
    free, _ = torch.cuda.mem_get_info(device)
    return TokenFeed.total_bytes(entries) < 0.4 * free


def data_digest(entries) -> str:
    """A digest of the prepared runs a model trains on: their run keys and cache keys.

    The cache key is a content hash of the source and the preparation settings, so the
    digest changes when a run is added, dropped or prepared from other data. Entries
    without a ``key`` (in-memory stand-ins) count by their run key alone.
    """
    lines = sorted(f"{e.run_key}\t{getattr(e, 'key', '')}" for e in entries)
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]


def _check_resume(ckpt: dict, cfg: AppConfig, geometry, path: Path,
                  digest: Optional[str] = None, n_runs: int = 0) -> None:
    sched = ckpt.get("scheduler") or {}
    saved_digest = sched.get("data_digest")
    if digest is not None and saved_digest is not None and saved_digest != digest:
        raise UsageError(
            f"{path} was trained on other prepared runs ({sched.get('n_runs', '?')} runs, "
            f"data digest {saved_digest}; now {n_runs} runs, {digest}): resuming would mix "
            f"them. Start over with --no-resume, or use another --model-name.")
    if digest is not None and saved_digest is None:
        log.warning("%s records no data digest (an older version wrote it): the prepared "
                    "runs cannot be checked", path)
    diffs = config_differences(ckpt.get("config") or {}, cfg.to_dict())
    saved_geom = geometry_from_checkpoint(ckpt)
    if saved_geom.extraction_hash != geometry.extraction_hash:
        diffs.append("token geometry (grid, brain mask or patch size)")
    if saved_geom.atlas_hash != geometry.atlas_hash:
        diffs.append("atlas labels or region rule")
    if diffs:
        raise UsageError(
            f"{path} was trained with other settings ({'; '.join(diffs[:6])}); refusing to "
            "overwrite it. Use the same settings to resume, or start over with --no-resume "
            "(or another --model-name).")


def run_pretraining(entries: Sequence, geometry, cfg: AppConfig, model_dir, *, device="cpu",
                    resume: bool = True, atlas: Optional[AtlasMeta] = None,
                    step_callback: Optional[Callable[[int, torch.nn.Module], None]] = None
                    ) -> Path:
    """Pretrain the masked autoencoder and return the final model file.

    Parameters
    ----------
    entries : sequence of cache entries
        Each with ``.tokens()`` -> (T, N, P), ``.subject``, ``.run_key``, ``.n_frames``.
    geometry : TokenGeometry
        Token layout of the entries (N, P must match).
    cfg : AppConfig
    model_dir : path-like
        Output folder of this model.
    device : str or torch.device
        ``"cpu"``, ``"cuda"``; under torchrun on CUDA each rank uses ``cuda:LOCAL_RANK``.
    resume : bool
        Continue from ``model_dir/checkpoint.pt`` when present (same settings required);
        ``False`` starts over and overwrites it.
    atlas : AtlasMeta, optional
        The atlas the masking used, stored in the checkpoint's metadata.
    step_callback : callable, optional
        ``callback(steps_done, model)`` on every rank after each optimiser step.

    Returns
    -------
    Path
        ``model_dir/model.pt``.

    Raises
    ------
    BadDataError
        No run is long enough for one window, or token shapes do not fit the geometry.
    UsageError
        ``model_dir`` holds a checkpoint trained with other settings, or the settings
        do not fit together (per-chunk masks with divided attention).
    AppError
        The loss became non-finite (exit code 1); the last good checkpoint stays.
    """
    cfg.validate()
    if cfg.masking.per_chunk and cfg.model.attention == "divided":
        raise UsageError('per-chunk masks are not tubes: set attention = "joint" in the '
                         '[model] section of --config')
    model_dir = Path(model_dir)
    dist = setup_distributed(device)
    try:
        with interrupt.deferred():  # SIGTERM stops after a step, with a checkpoint
            return _train(entries, geometry, cfg, model_dir, dist, resume, atlas,
                          step_callback)
    finally:
        dist.close()


def _train(entries, geometry, cfg, model_dir, dist: DistContext, resume, atlas,
           step_callback) -> Path:
    device, rank, world = dist.device, dist.rank, dist.world
    window, tp = cfg.geometry.window, cfg.geometry.temporal_patch
    n_time = window // tp
    expected = (geometry.n_tokens, geometry.patch_voxels)
    usable = []
    for e in entries:
        shape = tuple(e.tokens().shape)
        if shape[1:] != expected:
            raise BadDataError(f"{e.run_key}: tokens {shape} do not fit the geometry "
                               f"(T, {expected[0]}, {expected[1]}); re-run prepare")
        if e.n_frames >= window:
            usable.append(e)
        else:
            log.warning("%s: %d frames, shorter than one window (%d); skipped",
                        e.run_key, e.n_frames, window)
    if not usable:
        raise BadDataError(f"no run has at least {window} frames (one window)")
    train_entries, val_entries, val_subjects = split_subjects(usable, cfg.train.val_fraction,
                                                              cfg.seed)
    train_index = window_index(train_entries, window)
    val_index = window_index(val_entries, window)
    steps = total_steps(cfg, train_index.n_epoch_windows, world)
    batch = cfg.train.batch_size
    schedule = replace(cfg.train, lr=peak_lr(cfg))  # the preset's when unset
    groups = region_groups(geometry)  # built once; random masking only reads its size

    torch.manual_seed(cfg.seed)
    model = build_model(cfg, geometry).to(device)
    # Start from the trivial reconstruction (zero, the signal's mean): a randomly
    # initialised output layer predicts noise as large as the signal, and small CPU runs
    # spent their steps unlearning it (validation skill against predicting zero stayed
    # below 0 for 100 steps). Zero output weights still receive gradients at step one.
    torch.nn.init.zeros_(model.decoder_pred.weight)
    torch.nn.init.zeros_(model.decoder_pred.bias)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.train.weight_decay),
                                  lr=schedule.lr, betas=(0.9, 0.95),
                                  fused=True if device.type == "cuda" else None)
    model_dir.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        remove_dead_temps(model_dir)  # a killed save's partial checkpoint
    ckpt_path, final_path = model_dir / "checkpoint.pt", model_dir / "model.pt"
    digest = data_digest(usable)
    start, initial_val, elapsed_before = 0, None, 0.0
    if resume and ckpt_path.is_file():
        try:
            ckpt = load_checkpoint(ckpt_path, map_location=device)
        except BadDataError as exc:
            raise BadDataError(f"{exc}; start over with --no-resume") from exc
        _check_resume(ckpt, cfg, geometry, ckpt_path, digest, len(usable))
        model.load_state_dict(ckpt["model"])
        if ckpt.get("optimizer"):
            optimizer.load_state_dict(ckpt["optimizer"])
        start = int(ckpt["step"])
        sched = ckpt.get("scheduler") or {}
        initial_val = sched.get("initial_val_loss")
        elapsed_before = float(sched.get("seconds", 0.0))
        if sched.get("world_size", world) != world:
            log.warning("resuming with %d processes instead of %d: batches differ from an "
                        "uninterrupted run", world, sched.get("world_size"))
        if start >= steps and final_path.is_file():
            problem = checkpoint_problem(final_path)
            if problem is None:
                log.info("%s already finished (%d steps)", model_dir, start)
                return final_path
            # checkpoint.pt of the last step holds the same weights: write model.pt again
            log.warning("%s; writing it again from %s", problem, ckpt_path.name)
        log.info("resuming %s at step %d of %d", model_dir, start, steps)
    elif ckpt_path.is_file():
        log.info("not resuming: starting %s over", model_dir)

    net = model
    if cfg.train.compile:
        net = torch.compile(net)
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            net, device_ids=[device.index] if device.type == "cuda" else None)

    resident = _use_resident(cfg, device, train_entries + val_entries)
    feed = TokenFeed(train_entries, window, device, resident)
    val_feed = TokenFeed(val_entries, window, device, resident) if val_entries else None
    val_plan = (fixed_plan(val_index, cfg.train.val_batches * batch, cfg.seed, cfg.masking,
                           groups, n_time) if val_entries else None)
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda)

    regions = token_regions(geometry.patch_label)
    last_skill = SkillSums()

    def validate() -> Optional[float]:
        """Validation loss; its skill against trivial predictors goes to ``last_skill``."""
        nonlocal last_skill
        if val_plan is None or rank != 0:
            return None
        model.eval()
        total, count, sums = 0.0, 0, SkillSums()
        with torch.no_grad(), autocast():
            for i in range(0, len(val_plan[0]), batch):
                e, s, m = (a[i:i + batch] for a in val_plan)
                x = val_feed.to_device(e, s)
                mask = torch.from_numpy(m)
                # Decoded at the hidden tokens only, like the training loss.
                hidden = model.hidden_tokens(x, mask)
                loss = hidden.loss()
                sums.add(skill_sums(hidden, mask, model.feature_mask, regions))
                total += float(loss) * len(e)
                count += len(e)
        model.train()
        last_skill = sums
        return total / count

    def skill_columns() -> dict:
        if val_plan is None or rank != 0:
            return {}
        return {"val_skill_zero": last_skill.skill_zero,
                "val_skill_visible": last_skill.skill_visible}

    def plan(step):
        return step_plan(train_index, step, cfg.seed, batch, rank, world, cfg.masking,
                         groups, n_time)

    tsv = TrainLog(model_dir / "log.tsv", start if start > 0 else None, rank == 0)
    if start == 0:
        initial_val = validate()
        tsv.add(step=0, val_loss=initial_val, lr=lr_at(0, steps, schedule),
                **skill_columns())
    initial_skill = skill_columns()
    meta = ModelMeta(kind="pretrain", atlas=atlas or AtlasMeta())
    sched_state = lambda done: {"total_steps": steps, "world_size": world,  # noqa: E731
                                "initial_val_loss": initial_val, "data_digest": digest,
                                "n_runs": len(usable),
                                "seconds": elapsed_before + (time.perf_counter() - t_start)}

    from tqdm import tqdm

    bar = tqdm(total=steps, initial=start, desc="pretrain", unit="step", file=sys.stderr,
               disable=not (rank == 0 and sys.stderr.isatty()), dynamic_ncols=True)
    prefetch = Prefetcher(feed, plan, start, steps)
    tokens_per_step = batch * world * n_time * geometry.n_tokens
    t_start = t_log = time.perf_counter()
    wait = 0.0
    running = torch.zeros((), device=device)
    bad = torch.zeros((), dtype=torch.bool, device=device)
    n_running, last_saved, last_loss, last_val = 0, start, None, initial_val
    model.train()
    try:
        for step in range(start, steps):
            t0 = time.perf_counter()
            x, mask = prefetch.get(step)
            wait += time.perf_counter() - t0
            lr = lr_at(step, steps, schedule)
            for group in optimizer.param_groups:
                group["lr"] = lr
            # Per-step torch seed: dropout is reproducible across a resume.
            torch.manual_seed(int(np.random.default_rng([cfg.seed, step, rank, 1])
                                  .integers(2 ** 62)))
            with autocast():
                loss, _ = net(x, mask, return_pred=False)
            loss = loss.float()
            bad |= ~torch.isfinite(loss.detach())
            if not cuda and bool(bad):  # CPU: stop before the weights take a bad step
                _nonfinite(step + 1, float(loss.detach()), ckpt_path, last_saved)
            loss.backward()
            if cfg.train.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            running += loss.detach()
            n_running += 1
            done = step + 1
            if step_callback is not None:
                step_callback(done, model)
            bar.update(1)
            is_log = done % cfg.train.log_every == 0 or done == steps
            is_ckpt = done % cfg.train.checkpoint_every == 0 or done == steps
            if is_log or is_ckpt:
                flag = bad.clone().to(torch.int32)
                dist.all_max(flag)
                if bool(flag):
                    _nonfinite(done, float("nan"), ckpt_path, last_saved)
            if is_log:
                last_loss = float(running) / max(n_running, 1)
                running.zero_()
                n_running = 0
                last_val = validate()
                now = time.perf_counter()
                span, t_log = now - t_log, now
                n_steps = cfg.train.log_every if done % cfg.train.log_every == 0 else (
                    done % cfg.train.log_every)
                samples_per_s = batch * world * n_steps / span
                tsv.add(step=done, loss=last_loss, val_loss=last_val, lr=lr,
                        tokens_per_s=tokens_per_step * n_steps / span,
                        samples_per_s=samples_per_s, **skill_columns())
                bar.set_postfix(loss=f"{last_loss:.4f}",
                                val=f"{last_val:.4f}" if last_val is not None else "n/a")
                if bar.disable and rank == 0:  # batch jobs have no bar: log the progress
                    log.info("step %d/%d loss %.4f val %s skill %s lr %.2e %.1f samples/s",
                             done, steps, last_loss, "n/a" if last_val is None else
                             f"{last_val:.4f}", "n/a" if last_val is None else
                             f"{last_skill.skill_zero:.3f}", lr, samples_per_s)
            stop = interrupt.requested()  # SIGTERM: keep this step, then stop
            if (is_ckpt or stop) and rank == 0:
                save_checkpoint(ckpt_path, model=model, cfg=cfg, geometry=geometry, step=done,
                                optimizer=optimizer, scheduler=sched_state(done), meta=meta)
                last_saved = done
            if stop:
                raise Terminated(f"stopped by SIGTERM after step {done} of {steps}; "
                                 f"{ckpt_path} holds it: rerun the same command to resume")
    finally:
        prefetch.close()
        bar.close()
    seconds = elapsed_before + time.perf_counter() - t_start
    if rank == 0:
        save_checkpoint(final_path, model=model, cfg=cfg, geometry=geometry, step=steps,
                        scheduler=sched_state(steps), meta=meta)
        plot_loss(tsv, model_dir / "loss.png")
        summary = {
            "steps": steps, "peak_lr": schedule.lr,
            "final_loss": last_loss, "final_val_loss": last_val,
            "initial_val_loss": initial_val,
            # 1 - MSE / MSE(trivial predictor) on the validation windows' hidden voxels:
            # 0 = no better than predicting zero / the visible tokens' region mean.
            "initial_val_skill": initial_skill or None,
            "final_val_skill": skill_columns() or None,
            "tokens_seen": tokens_per_step * steps,
            "windows_seen": batch * world * steps, "seconds": round(seconds, 3),
            "data_wait_fraction": round(wait / max(time.perf_counter() - t_start, 1e-9), 4),
            "device": str(device), "world_size": world, "gpu_resident": resident,
            "geometry": geometry.summary(), "masking": asdict(cfg.masking),
            "model": resolve_model_config(cfg.model), "n_parameters": count_parameters(model),
            "n_subjects": len({str(e.subject) for e in usable}),
            "val_subjects": val_subjects, "n_runs": len(usable),
            "n_train_windows": len(train_index), "n_val_windows": len(val_index),
            "n_epoch_windows": train_index.n_epoch_windows,
            "atlas": None if atlas is None else atlas.name,
        }
        (model_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        log.info("pretraining done: %d steps, loss %s, val loss %s -> %s", steps, last_loss,
                 last_val, final_path)
    dist.barrier()
    return final_path


def _nonfinite(step: int, value: float, ckpt_path: Path, last_saved: int) -> None:
    where = (f"the last good checkpoint is {ckpt_path} (step {last_saved})"
             if last_saved and ckpt_path.is_file() else "no checkpoint was written yet")
    raise AppError(f"pretraining stopped at step {step}: the loss is not finite ({value}); "
                   f"{where}. Check the cached tokens for NaN/inf or lower train.lr.")
