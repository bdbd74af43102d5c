"""Preparation of BOLD runs into model-ready brain tokens in the token cache.

Per run, in order: read the NIfTI (streamed frame by frame, so a corrupt or truncated file
fails here and the whole 4D array is never held in float64), check it (4D, long enough,
template space, grid, brain mask grid, finite), bring it onto the model grid (as is, or
resampled from another resolution of the same space), optionally regress confounds and
resample in time, normalise (percent signal change with one scale per run, or a z-score
per voxel), cut tokens and write the cache entry atomically (:mod:`bids_roimae.io.cache`).

All work after reading happens on the ``(T, V)`` matrix of the ``V`` template-brain voxels
that are token voxels, float32 throughout. Reading the NIfTI and bringing it onto the model
grid is :mod:`bids_roimae.io.bold`; the scaling numerics are
:mod:`bids_roimae.core.scaling`.
"""

from __future__ import annotations

import errno
import logging
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from bids_roimae.config import PrepConfig
from bids_roimae.core.scaling import (
    global_scale_inplace,
    resample_time,
    resampled_length,
    zscore_inplace,
)
from bids_roimae.errors import AppError, BadDataError, OutputError, Terminated, one_line
from bids_roimae.io.atomic import no_space_error
from bids_roimae.io.bold import (  # noqa: F401
    BoldSource,
    check_template_grid,
    model_grid_matrix,
    outside_run_mask,
    template_space,
)
from bids_roimae.io.cache import (
    CacheEntry,
    cache_root,
    cached_entry,
    entry_path,
    remove_stale_temps,
    write_tokens,
)
from bids_roimae.io.cache_keys import HASH_INDEX_DIRNAME, cache_key, prep_settings

logger = logging.getLogger(__name__)



def prepare_run(run, geometry, template_img, prep_cfg: Optional[PrepConfig], output_dir, *,
                window: int, work_dir=None, overwrite: bool = False,
                space: Optional[str] = None, cached_only: bool = False
                ) -> Optional[CacheEntry]:
    """Prepare one BOLD run into a cache entry (or find it already cached).

    Parameters
    ----------
    run : BoldRun
        The run (its ``space`` entity must be the template space).
    geometry : TokenGeometry
        Token layout on the model grid (``N`` tokens of ``P`` voxels).
    template_img : nibabel image or Template
        Template brain mask on the model grid (a ``Template`` gives its ``mask_img`` and
        ``space``); it must match ``geometry``'s grid and affine.
    prep_cfg : PrepConfig or None
        Confounds, target TR, storage dtype (``None``: defaults).
    output_dir : path
        Output dataset; the entry goes to ``cache/sub-<label>/``.
    window : int
        Frames per model window; shorter runs are refused.
    work_dir : path, optional
        Accepted for the workflow's signature; preparation streams in memory and needs no
        scratch files.
    overwrite : bool
        Rebuild even when a matching entry exists.
    space : str, optional
        Template space name; default ``template_img.space``, else the ``tpl-<space>`` of
        the template file name, else MNI152NLin2009cAsym.
    cached_only : bool
        Only look the run up: ``None`` when it is not cached yet.

    Returns
    -------
    CacheEntry or None
        Tokens (T, N, P) float16 (or int8 with ``meta["scale"]``); None only with
        ``cached_only``.

    Raises
    ------
    BadDataError
        Unreadable, 3D, too short, non-finite, wrong space or grid, mask grid mismatch,
        missing confounds; the message starts with the file name.
    """
    prep = prep_cfg if prep_cfg is not None else PrepConfig()
    space = template_space(template_img, space)
    mask_img = getattr(template_img, "mask_img", template_img)
    check_template_grid(geometry, mask_img)
    name = Path(run.path).name
    if run.space != space:
        raise BadDataError(f"{name}: is in space {run.space!r}, but the model grid is "
                           f"{space}; only {space} BOLD can be used")
    if not Path(run.path).is_file():
        raise BadDataError(f"{name}: file not found ({run.path})")
    root = cache_root(output_dir)
    key = cache_key(run, geometry, prep, space, index_dir=root / HASH_INDEX_DIRNAME)
    final = entry_path(output_dir, run, key)
    if not overwrite:
        entry = cached_entry(output_dir, run, key)
        if entry is not None:
            _check_length(name, entry.n_frames, window, entry.meta.get("target_tr"))
            logger.info("%s: cached (%s)", run.key, final.name)
            return entry
    if cached_only:
        return None
    started = time.perf_counter()
    source = BoldSource(run.path)
    tr_in, tr_source = _input_tr(run, source, needed=prep.target_tr is not None
                                 or prep.confounds != "none")
    expected = (resampled_length(source.n_frames, tr_in, prep.target_tr)
                if prep.target_tr else source.n_frames)
    _check_length(name, expected, window, prep.target_tr)
    if prep.confounds != "none":
        _require_confounds(run, prep.confounds)
    outside = outside_run_mask(run, source, geometry, mask_img)  # checks its grid first
    brain, grid_info = model_grid_matrix(source, geometry, mask_img, space)
    n_bad = int(brain.size - np.count_nonzero(np.isfinite(brain)))
    if n_bad:
        bad_vox = int(np.count_nonzero(~np.isfinite(brain).all(axis=0)))
        raise BadDataError(f"{name}: {n_bad} non-finite values (NaN/inf) in {bad_vox} "
                           f"voxels inside the template brain")
    _check_not_flat(name, brain)
    # The voxel baseline is taken before confound regression, which may remove the mean.
    baseline = None if prep.normalize == "voxel" else brain.mean(axis=0, dtype=np.float64)
    confound_info: dict = {}
    if prep.confounds != "none":
        brain, confound_info = _regress_confounds(run, brain, prep.confounds, tr_in)
    tr_out = tr_in
    if prep.target_tr is not None:
        brain = resample_time(brain, tr_in, prep.target_tr)
        tr_out = float(prep.target_tr)
    _check_length(name, brain.shape[0], window, prep.target_tr)
    if prep.normalize == "voxel":
        norm_info = {"normalize": "voxel", "n_zero_variance_voxels": zscore_inplace(brain)}
    else:
        norm_info = global_scale_inplace(brain, baseline, ignore=outside)
        if norm_info["normalize"] != "global-psc":
            logger.warning("%s: the BOLD signal is not positive intensities (median voxel "
                           "mean %.3g), so it is scaled without percent signal change",
                           name, norm_info["median_baseline"])
    if outside is not None:
        brain[:, outside] = 0.0
    meta = {
        "key": key, "subject": run.subject, "session": run.session, "task": run.task,
        "run": run.run, "run_key": run.key, "entities": dict(run.entities),
        "source": str(Path(run.path).absolute()), "space": space,
        "mask_path": None if run.mask_path is None else str(run.mask_path),
        "confounds_path": None if run.confounds_path is None else str(run.confounds_path),
        "prep": prep_settings(prep), "target_tr": prep.target_tr,
        "tr": tr_out, "tr_original": tr_in, "tr_source": tr_source,
        "n_frames_source": source.n_frames, "extraction_hash": geometry.extraction_hash,
        "patch_size": geometry.patch_size, "n_tokens": geometry.n_tokens,
        "n_brain_voxels": int(brain.shape[1]), **norm_info,
        "n_outside_run_mask": 0 if outside is None else int(outside.sum()),
        **grid_info, **confound_info,
    }
    try:
        entry = write_tokens(final, brain, geometry, prep.dtype, meta)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:  # say where and how much, whichever write hit it
            needed = (brain.shape[0] * geometry.n_tokens * geometry.patch_voxels
                      * np.dtype(prep.dtype).itemsize)
            reason = no_space_error(final.parent, needed).strerror
        else:
            reason = one_line(exc)
        raise OutputError(f"{name}: cannot write its cache entry: {reason}") from exc
    logger.info("%s: prepared %d frames x %d tokens in %.1f s -> %s", run.key,
                brain.shape[0], geometry.n_tokens, time.perf_counter() - started, final.name)
    return entry


def prepare_runs(runs: Sequence, geometry, template_img, prep_cfg, output_dir, *,
                 window: int, nprocs: int = 1, work_dir=None, space: Optional[str] = None
                 ) -> tuple[list[CacheEntry], list[tuple[object, AppError]]]:
    """Prepare many runs, in parallel processes when ``nprocs > 1``.

    A run that fails is logged as one line (file and problem) and returned in the
    failures list; the others still finish. A stop (SIGTERM, Ctrl-C) is not a run's
    failure: it propagates at once, and runs not yet started are not started.

    Returns
    -------
    entries : list of CacheEntry
        Successful runs, in input order.
    failures : list of (BoldRun, AppError)
        Failed runs with their error (``exit_code`` tells the kind), in input order.
    """
    results: list = [None] * len(runs)
    kwargs = dict(window=window, work_dir=work_dir, space=space)
    # Leftovers of killed writers (a full disk stays full otherwise), before any write.
    for folder in sorted({entry_path(output_dir, run, "x").parent for run in runs}):
        if folder.is_dir():
            remove_stale_temps(folder)
    # Cache hits first, in this process: the worker pool (spawned processes that import
    # torch and receive the geometry) is only worth starting for runs left to prepare.
    todo = []
    for i, run in enumerate(runs):
        try:
            results[i] = prepare_run(run, geometry, template_img, prep_cfg, output_dir,
                                     cached_only=nprocs > 1 and len(runs) > 1, **kwargs)
        except Terminated:
            raise
        except Exception as exc:  # noqa: BLE001 - one bad run must not stop the rest
            results[i] = _as_app_error(run, exc)
        if results[i] is None:
            todo.append(i)
    if todo:
        # spawn: workers must not inherit the parent's thread pools (torch, BLAS) mid-state.
        ctx = multiprocessing.get_context("spawn")
        pool = ProcessPoolExecutor(max_workers=min(nprocs, len(todo)), mp_context=ctx)
        try:
            futures = {pool.submit(prepare_run, runs[i], geometry, template_img, prep_cfg,
                                   output_dir, **kwargs): i for i in todo}
            for fut in as_completed(futures):
                i = futures[fut]
                try:
                    results[i] = fut.result()
                    logger.info("%s: ready (%s)", runs[i].key, results[i].path.name)
                except Terminated:
                    raise
                except Exception as exc:  # noqa: BLE001 - includes a worker killed by OOM
                    results[i] = _as_app_error(runs[i], exc)
        except BaseException:
            # A stop: queued runs are dropped and running ones end now (a worker's partial
            # write is a temporary file, removed by the next run since its process is gone);
            # waiting for them could outlast docker stop's grace period.
            pool.shutdown(wait=False, cancel_futures=True)
            for worker in multiprocessing.active_children():
                worker.terminate()
            raise
        pool.shutdown(wait=True)
    entries = [r for r in results if isinstance(r, CacheEntry)]
    failures = [(run, r) for run, r in zip(runs, results) if isinstance(r, AppError)]
    for _, err in failures:
        logger.error("skipped: %s", err)
    return entries, failures


# -- steps ---------------------------------------------------------------------------------


def _check_length(name: str, n_frames: int, window: int, target_tr) -> None:
    if n_frames < window:
        after = f" after resampling to TR {target_tr:g} s" if target_tr else ""
        raise BadDataError(f"{name}: has {n_frames} frames{after}, shorter than one "
                           f"window ({window})")


def _check_not_flat(name: str, brain: np.ndarray) -> None:
    """A run whose every brain voxel is constant over time holds no signal (all zeros, a
    failed export): caching it would train the model on nothing."""
    if brain.shape[0] and not np.any(brain != brain[:1]):
        value = float(brain[0, 0]) if brain.size else 0.0
        raise BadDataError(f"{name}: the signal is flat (every brain voxel is constant over "
                           f"time{', all zero' if value == 0 and not brain.any() else ''}); "
                           f"not a usable BOLD run")


def _input_tr(run, source: BoldSource, needed: bool) -> tuple[Optional[float], str]:
    """The run's TR in seconds and where it came from (sidecar first, then header)."""
    if run.tr is not None and run.tr > 0:
        return float(run.tr), run.tr_source
    header_tr = source.header_tr
    if header_tr:
        return header_tr, "header"
    if needed:
        raise BadDataError(f"{Path(run.path).name}: no repetition time (no RepetitionTime "
                           f"in the sidecar and pixdim[4] is 0)")
    return None, "unknown"


def _require_confounds(run, strategy: str) -> None:
    if run.confounds_path is None or not Path(run.confounds_path).is_file():
        raise BadDataError(f"{Path(run.path).name}: confound regression ({strategy}) was "
                           f"asked for, but the run has no confounds file"
                           + (f" ({run.confounds_path})" if run.confounds_path else ""))


def _regress_confounds(run, brain: np.ndarray, strategy: str, tr: Optional[float]
                       ) -> tuple[np.ndarray, dict]:
    """Regress fMRIPrep confounds out of ``brain`` (T, V); scrubbing drops frames."""
    name = Path(run.path).name
    import nilearn
    from nilearn import signal
    from nilearn.interfaces.fmriprep import load_confounds

    parts = ("motion", "high_pass", "wm_csf") + (("scrub",) if strategy == "scrubbing"
                                                  else ())
    try:
        confounds, sample_mask = load_confounds(str(run.path), strategy=parts,
                                                motion="basic", wm_csf="basic")
    except Exception as exc:  # noqa: BLE001 - nilearn raises ValueError/KeyError/...
        raise BadDataError(f"{name}: confounds cannot be used ({one_line(exc)})") from exc
    if len(confounds) != brain.shape[0]:
        raise BadDataError(f"{name}: confounds file has {len(confounds)} rows for "
                           f"{brain.shape[0]} frames")
    # nilearn >= 0.14 spells "no standardisation" None and deprecates False.
    no_std = None if _version_at_least(nilearn.__version__, (0, 14)) else False
    cleaned = signal.clean(brain, confounds=confounds.to_numpy(np.float64),
                           sample_mask=sample_mask, detrend=False, standardize=no_std,
                           standardize_confounds=True, filter=False, t_r=tr)
    info = {"confound_columns": list(confounds.columns),
            "n_frames_scrubbed": 0 if sample_mask is None
            else int(brain.shape[0] - len(sample_mask))}
    return np.ascontiguousarray(cleaned, dtype=np.float32), info


def _as_app_error(run, exc: BaseException) -> AppError:
    if isinstance(exc, AppError):
        return exc
    logger.debug("unexpected failure preparing %s", run.path, exc_info=exc)
    err = AppError(f"{Path(run.path).name}: preparation failed "
                   f"({type(exc).__name__}: {one_line(exc)})")
    err.__cause__ = exc
    return err


def _version_at_least(version: str, wanted: tuple) -> bool:
    parts = ("".join(c for c in p if c.isdigit()) or "0" for p in version.split(".")[:2])
    return tuple(int(p) for p in parts) >= wanted


