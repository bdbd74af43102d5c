"""Preparation of one BOLD run into brain tokens: checks, resampling, confounds, scaling."""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Optional

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from grids import AFFINE, GRID, SPACE, WINDOW, template_grid

from bids_roimae.config import PrepConfig
from bids_roimae.core.scaling import global_scale_inplace, zscore_inplace
from bids_roimae.errors import EXIT_BAD_DATA, AppError, BadDataError, OutputError
from bids_roimae.io.discovery import BoldRun
from bids_roimae.io.preparation import prepare_run, prepare_runs

VOXEL = PrepConfig(normalize="voxel")  # exact per-voxel z-scores: layout checks


@pytest.fixture(scope="module")
def grid():
    return template_grid()


def write_bold(folder: Path, data: np.ndarray, affine=AFFINE, subject="01", tr=2.0,
               name=None, mask: Optional[np.ndarray] = None, mask_affine=None,
               confounds: Optional[pd.DataFrame] = None, space=SPACE) -> BoldRun:
    """Save an fMRIPrep-named BOLD run (plus optional mask/confounds) and describe it."""
    func = folder / f"sub-{subject}" / "func"
    func.mkdir(parents=True, exist_ok=True)
    stem = f"sub-{subject}_task-rest"
    path = func / (name or f"{stem}_space-{space}_desc-preproc_bold.nii.gz")
    img = nib.Nifti1Image(data, affine)
    if data.ndim == 4:
        img.header.set_zooms(tuple(np.sqrt((affine[:3, :3] ** 2).sum(0))) + (tr,))
    nib.save(img, path)
    mask_path = conf_path = None
    if mask is not None:
        mask_path = func / f"{stem}_space-{space}_desc-brain_mask.nii.gz"
        ma = affine if mask_affine is None else mask_affine
        nib.save(nib.Nifti1Image(mask.astype(np.uint8), ma), mask_path)
    if confounds is not None:
        conf_path = func / f"{stem}_desc-confounds_timeseries.tsv"
        confounds.to_csv(conf_path, sep="\t", index=False, na_rep="n/a")
        conf_path.with_suffix(".json").write_text(json.dumps({}))
    return BoldRun(subject=subject, session=None, task="rest", run=None,
                   entities={"subject": subject, "task": "rest", "space": space},
                   path=path, mask_path=mask_path, confounds_path=conf_path, tr=tr,
                   tr_source="sidecar", space=space)


def random_bold(n_frames=24, seed=0, shape=GRID) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.uniform(500, 1500, size=shape)[..., None]
    return (base + rng.normal(0, 10, size=shape + (n_frames,))).astype(np.float32)


def zscore_ref(series: np.ndarray) -> np.ndarray:
    series = series.astype(np.float64)
    with np.errstate(invalid="ignore"):  # background series are flat: NaN, masked later
        return (series - series.mean(-1, keepdims=True)) / series.std(-1, keepdims=True)


# -- values and layout --------------------------------------------------------------------
def test_tokens_hold_zscored_voxels_at_their_grid_positions(tmp_path, grid):
    mask, geometry, template = grid
    data = random_bold(24)
    run = write_bold(tmp_path / "bids", data)
    entry = prepare_run(run, geometry, template, VOXEL, tmp_path / "out", window=WINDOW)
    tokens = entry.tokens()
    assert tokens.shape == (24, geometry.n_tokens, 27) and tokens.dtype == np.float16
    expected = zscore_ref(data)
    ps = geometry.patch_size
    # Locate voxels by hand (patch index, then C-order offset inside the patch).
    brain_vox = np.argwhere(mask)
    for x, y, z in brain_vox[:: max(1, len(brain_vox) // 25)]:
        rel = np.array([x, y, z]) - geometry.origin
        n = int(np.flatnonzero((geometry.patch_ijk == rel // ps).all(axis=1))[0])
        dx, dy, dz = rel % ps
        p = dx * ps * ps + dy * ps + dz
        np.testing.assert_allclose(tokens[:, n, p], expected[x, y, z], atol=2e-2)
    # And the whole array agrees with the geometry's own extraction; background is 0.
    ref = geometry.extract(np.where(mask[..., None], expected, 0.0))
    np.testing.assert_allclose(tokens.astype(np.float32), ref, atol=2e-2)
    assert not tokens[:, ~geometry.voxel_mask].any()


def test_zscore_mean_zero_sd_one_and_flat_voxels_zero(tmp_path, grid):
    mask, geometry, template = grid
    data = random_bold(30, seed=3)
    data[4, 8, 5, :] = 777.0  # a constant brain voxel
    run = write_bold(tmp_path / "bids", data)
    entry = prepare_run(run, geometry, template, VOXEL, tmp_path / "out", window=WINDOW)
    tok = entry.tokens().astype(np.float32)[:, geometry.voxel_mask]  # (T, V)
    flat = np.abs(tok).max(axis=0) == 0
    assert flat.sum() == 1 and entry.meta["n_zero_variance_voxels"] == 1
    np.testing.assert_allclose(tok[:, ~flat].mean(axis=0), 0, atol=2e-3)
    np.testing.assert_allclose(tok[:, ~flat].std(axis=0), 1, atol=2e-3)


def test_zscore_inplace_matrix():
    rng = np.random.default_rng(1)
    mat = rng.normal(5, 3, size=(40, 6)).astype(np.float32)
    mat[:, 2] = 1e4
    n_flat = zscore_inplace(mat)
    assert n_flat == 1 and not mat[:, 2].any()
    np.testing.assert_allclose(mat[:, [0, 1, 3, 4, 5]].std(axis=0), 1, atol=1e-5)


def test_global_scaling_keeps_amplitude_and_removes_units(tmp_path, grid):
    """Default scaling: a region fluctuating twice as much stays twice as large, while a
    voxel's baseline intensity and the run's scanner units do not matter."""
    mask, geometry, template = grid
    rng = np.random.default_rng(4)
    n = 40
    base = rng.uniform(600, 1400, size=GRID)[..., None]
    amp = np.ones(GRID)
    amp[:2] = 2.0  # a slab of voxels with twice the percent fluctuation
    data = base * (1 + 0.01 * amp[..., None] * rng.standard_normal(GRID + (n,)))
    tokens = {}
    for units in (1.0, 7.5):  # the same run in other scanner units
        run = write_bold(tmp_path / f"bids{units}", (units * data).astype(np.float32))
        entry = prepare_run(run, geometry, template, None, tmp_path / f"out{units}",
                            window=WINDOW)
        assert entry.meta["normalize"] == "global-psc"
        tokens[units] = geometry.scatter(entry.tokens().astype(np.float32).std(axis=0))
    np.testing.assert_allclose(tokens[1.0][mask], tokens[7.5][mask], atol=2e-2)
    sd = tokens[1.0]
    high, low = sd[mask & (amp == 2)], sd[mask & (amp == 1)]
    assert low.size > high.size  # the median voxel is a unit-amplitude one
    assert abs(np.median(low) - 1.0) < 0.08
    assert abs(np.median(high) / np.median(low) - 2.0) < 0.1


def test_global_scaling_of_demeaned_input_uses_one_scale(caplog):
    rng = np.random.default_rng(2)
    mat = (rng.standard_normal((50, 8)) * [1, 1, 1, 1, 1, 3, 3, 0]).astype(np.float32)
    info = global_scale_inplace(mat, mat.mean(axis=0))
    assert info["normalize"] == "global-sd" and info["n_zero_variance_voxels"] == 1
    sd = mat.std(axis=0)
    assert not mat[:, 7].any()
    assert abs(np.median(sd[:7]) - 1.0) < 1e-5
    np.testing.assert_allclose(sd[5:7] / sd[:5].mean(), 3.0, rtol=0.3)
    # Raw intensities with a near-zero baseline voxel (dropout): floored, not blown up.
    raw = (1000 + rng.standard_normal((50, 8)) * 10).astype(np.float32)
    raw[:, 0] = 1.0 + rng.standard_normal(50).astype(np.float32) * 10
    info = global_scale_inplace(raw, raw.mean(axis=0))
    assert info["normalize"] == "global-psc"
    assert raw[:, 0].std() < 15 * np.median(raw[:, 1:].std(axis=0))
    # Background outside the participant's mask (dim, noisy) does not set the scale.
    brain = (1000 + rng.standard_normal((50, 6)) * 10).astype(np.float32)
    background = (5 + rng.standard_normal((50, 10)) * 3).astype(np.float32)
    both = np.hstack([brain, background])
    ignore = np.r_[np.zeros(6, bool), np.ones(10, bool)]
    alone = global_scale_inplace(brain.copy(), brain.mean(axis=0))
    info = global_scale_inplace(both, both.mean(axis=0), ignore=ignore)
    assert info["normalize"] == "global-psc"
    assert np.isclose(info["global_scale"], alone["global_scale"])
    unmasked = np.hstack([brain, background])
    assert global_scale_inplace(unmasked, unmasked.mean(axis=0)
                                )["normalize"] == "global-sd"  # what ignoring prevents


def test_run_mask_zeroes_template_voxels_outside_subject_brain(tmp_path, grid):
    mask, geometry, template = grid
    run_mask = mask.copy()
    run_mask[:, :, 7:] = False  # the subject's brain misses the top slices
    run = write_bold(tmp_path / "bids", random_bold(20), mask=run_mask)
    entry = prepare_run(run, geometry, template, None, tmp_path / "out", window=WINDOW)
    expected_out = int((mask & ~run_mask).sum())
    assert expected_out > 0 and entry.meta["n_outside_run_mask"] == expected_out
    grid_abs = geometry.scatter(np.abs(entry.tokens().astype(np.float32)).max(axis=0))
    assert not grid_abs[mask & ~run_mask].any()
    assert grid_abs[mask & run_mask].all()


def test_resampling_from_a_1mm_grid(tmp_path, grid):
    mask, geometry, template = grid
    # The same field of view at 1 mm: voxel centres at +-0.5 mm around each 2 mm centre.
    fine_affine = np.diag([1.0, 1.0, 1.0, 1.0])
    fine_affine[:3, 3] = AFFINE[:3, 3] - 0.5
    fine_shape = tuple(2 * g for g in GRID)
    ijk = np.indices(fine_shape).reshape(3, -1).T
    world = ijk @ fine_affine[:3, :3].T + fine_affine[:3, 3]
    field = (world @ np.array([0.5, 1.0, -0.7])).reshape(fine_shape)  # linear in mm
    rng = np.random.default_rng(5)
    gain, shift = rng.uniform(0.5, 1.5, 20), rng.normal(0, 30, 20)
    data = (1000 + field[..., None] * gain + shift).astype(np.float32)
    run = write_bold(tmp_path / "bids", data, affine=fine_affine)
    entry = prepare_run(run, geometry, template, VOXEL, tmp_path / "out", window=WINDOW)
    assert entry.meta["resampled"] and entry.meta["source_grid"] == list(fine_shape)
    assert entry.tokens().shape == (20, geometry.n_tokens, 27)
    # Expected: the same linear field sampled at model voxel centres, then z-scored.
    mijk = np.indices(GRID).reshape(3, -1).T
    mworld = mijk @ AFFINE[:3, :3].T + AFFINE[:3, 3]
    mfield = (mworld @ np.array([0.5, 1.0, -0.7])).reshape(GRID)
    expected = zscore_ref(1000 + mfield[..., None] * gain + shift)
    got = geometry.scatter(entry.tokens()[7].astype(np.float32))
    interior = mask.copy()
    interior[[0, 1, -2, -1], :, :] = interior[:, [0, 1, -2, -1], :] = False
    interior[:, :, [0, 1, -2, -1]] = False
    np.testing.assert_allclose(got[interior], expected[..., 7][interior], atol=0.05)


def test_resampling_matches_nilearn_and_refuses_nan_in_brain(tmp_path, grid):
    from nilearn.image import resample_to_img

    mask, geometry, template = grid
    coarse = np.diag([3.0, 3.0, 3.0, 1.0])  # a 3 mm grid over the same field of view
    coarse[:3, 3] = AFFINE[:3, 3] - 0.5
    rng = np.random.default_rng(8)
    data = rng.normal(100, 5, size=(9, 12, 8, 12)).astype(np.float32)
    run = write_bold(tmp_path / "bids", data, affine=coarse)
    entry = prepare_run(run, geometry, template, VOXEL, tmp_path / "out", window=WINDOW)
    ref = resample_to_img(nib.Nifti1Image(data, coarse), template,
                          interpolation="continuous", force_resample=True, copy_header=True)
    expected = zscore_ref(np.asarray(ref.dataobj))
    np.testing.assert_allclose(entry.tokens().astype(np.float32),
                               geometry.extract(np.where(mask[..., None], expected, 0)),
                               atol=2e-2)
    data[4, 6, 4, 2] = np.inf  # a source voxel in the middle of the brain
    bad = write_bold(tmp_path / "bids2", data, affine=coarse)
    with pytest.raises(BadDataError, match=r"non-finite values \(NaN/inf\) in 1 voxels"):
        prepare_run(bad, geometry, template, None, tmp_path / "out", window=WINDOW)


def test_target_tr_resampling_changes_frame_count(tmp_path, grid):
    mask, geometry, template = grid
    run = write_bold(tmp_path / "bids", random_bold(30), tr=2.0)
    entry = prepare_run(run, geometry, template, PrepConfig(target_tr=1.0), tmp_path / "out",
                        window=WINDOW)
    assert entry.n_frames == 60 and entry.tr == 1.0 and entry.meta["tr_original"] == 2.0
    slow = write_bold(tmp_path / "bids2", random_bold(30), tr=2.5)
    entry2 = prepare_run(slow, geometry, template, PrepConfig(target_tr=2.0),
                         tmp_path / "out", window=WINDOW)
    assert entry2.n_frames == 38 and entry2.meta["tr_original"] == 2.5


def test_header_tr_used_when_sidecar_has_none(tmp_path, grid):
    mask, geometry, template = grid
    run = replace(write_bold(tmp_path / "bids", random_bold(20), tr=3.0), tr=None,
                  tr_source="none")
    entry = prepare_run(run, geometry, template, PrepConfig(target_tr=1.5), tmp_path / "out",
                        window=WINDOW)
    assert entry.meta["tr_source"] == "header" and entry.n_frames == 40


def _confounds(n, seed=0, fd_spike=None):
    rng = np.random.default_rng(seed)
    cols = ["trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z", "white_matter",
            "csf"]
    df = pd.DataFrame(rng.normal(size=(n, len(cols))), columns=cols)
    t = np.arange(n)
    df["cosine00"] = np.cos(np.pi * (t + 0.5) / n)
    df["framewise_displacement"] = np.r_[np.nan, np.full(n - 1, 0.1)]
    df["std_dvars"] = np.r_[np.nan, np.full(n - 1, 1.0)]
    if fd_spike is not None:
        df.loc[fd_spike, "framewise_displacement"] = 2.0
    return df


def test_simple_confounds_are_regressed_out(tmp_path, grid):
    mask, geometry, template = grid
    n = 40
    conf = _confounds(n)
    data = random_bold(n, seed=2)
    data += (conf["white_matter"].to_numpy() * 25).astype(np.float32)  # shared nuisance
    run = write_bold(tmp_path / "bids", data, confounds=conf)
    entry = prepare_run(run, geometry, template, PrepConfig(confounds="simple"),
                        tmp_path / "out", window=WINDOW)
    tok = entry.tokens().astype(np.float32)[:, geometry.voxel_mask]
    wm = conf["white_matter"].to_numpy()
    corr = np.corrcoef(np.c_[wm, tok[:, :50]].T)[0, 1:]
    assert np.abs(corr).max() < 0.02
    assert "white_matter" in entry.meta["confound_columns"]


def test_scrubbing_drops_high_motion_frames(tmp_path, grid):
    mask, geometry, template = grid
    run = write_bold(tmp_path / "bids", random_bold(40), confounds=_confounds(40, fd_spike=20))
    entry = prepare_run(run, geometry, template, PrepConfig(confounds="scrubbing"),
                        tmp_path / "out", window=WINDOW)
    assert entry.n_frames == 39 and entry.meta["n_frames_scrubbed"] == 1


def test_real_bold_run_and_template_space_from_file_name(tmp_path, grid):
    mask, geometry, _ = grid
    tpl_path = tmp_path / "tpl" / f"tpl-{SPACE}_res-02_desc-brain_mask.nii.gz"
    tpl_path.parent.mkdir()
    nib.save(nib.Nifti1Image(mask.astype(np.uint8), AFFINE), tpl_path)
    template = nib.load(tpl_path)  # as the workflow passes it: the space is in its name
    stand_in = write_bold(tmp_path / "bids", random_bold(20))
    entities = {"subject": "01", "task": "rest", "run": "1", "space": SPACE}
    run = BoldRun(subject="01", session=None, task="rest", run="1", entities=entities,
                      path=stand_in.path, mask_path=None, confounds_path=None, tr=2.0,
                      tr_source="sidecar", space=SPACE)
    entry = prepare_run(run, geometry, template, None, tmp_path / "out", window=WINDOW)
    assert entry.path.name.startswith("sub-01_task-rest_run-1_") and entry.run == "1"
    other = nib.Nifti1Image(mask.astype(np.uint8), AFFINE)
    with pytest.raises(BadDataError, match="MNI152NLin6Asym"):
        prepare_run(run, geometry, other, None, tmp_path / "out", window=WINDOW,
                    space="MNI152NLin6Asym")


# -- bad inputs: exit code 65 and one line naming the file ------------------------------
def _assert_bad(excinfo, name, *needles):
    err = excinfo.value
    assert err.exit_code == EXIT_BAD_DATA == 65
    text = str(err)
    assert "\n" not in text and text.startswith(name)
    for needle in needles:
        assert needle in text, text


def _bad(tmp_path, grid, run, prep=None, window=WINDOW):
    mask, geometry, template = grid
    with pytest.raises(BadDataError) as excinfo:
        prepare_run(run, geometry, template, prep, tmp_path / "out", window=window)
    return excinfo


def test_zero_byte_file(tmp_path, grid):
    run = write_bold(tmp_path, random_bold(10))
    run.path.write_bytes(b"")
    _assert_bad(_bad(tmp_path, grid, run), run.path.name, "empty")


def test_truncated_gzip(tmp_path, grid):
    run = write_bold(tmp_path, random_bold(20))
    blob = run.path.read_bytes()
    run.path.write_bytes(blob[: len(blob) // 2])
    _assert_bad(_bad(tmp_path, grid, run), run.path.name, "truncated or corrupt gzip")


def test_corrupt_gzip_body(tmp_path, grid):
    run = write_bold(tmp_path, random_bold(20))
    blob = bytearray(run.path.read_bytes())
    blob[len(blob) // 2: len(blob) // 2 + 64] = bytes(64)
    run.path.write_bytes(bytes(blob))
    _assert_bad(_bad(tmp_path, grid, run), run.path.name, "truncated or corrupt gzip")


def test_3d_image(tmp_path, grid):
    run = write_bold(tmp_path, random_bold(1)[..., 0])
    _assert_bad(_bad(tmp_path, grid, run), run.path.name, "is 3D, expected 4D BOLD")


def test_nan_inside_brain(tmp_path, grid):
    data = random_bold(20)
    data[6, 8, 5, 3:6] = np.nan
    data[0, 0, 0, :] = np.nan  # background NaN is harmless on its own
    run = write_bold(tmp_path, data)
    _assert_bad(_bad(tmp_path, grid, run), run.path.name, "3 non-finite values", "1 voxels")


def test_too_short_for_a_window(tmp_path, grid):
    run = write_bold(tmp_path, random_bold(12))
    _assert_bad(_bad(tmp_path, grid, run, window=20), run.path.name,
                "has 12 frames, shorter than one window (20)")


def test_other_space(tmp_path, grid):
    run = write_bold(tmp_path, random_bold(20), space="MNI152NLin6Asym")
    _assert_bad(_bad(tmp_path, grid, run), run.path.name, "MNI152NLin6Asym")


def test_affine_outside_template_field_of_view(tmp_path, grid):
    shifted = AFFINE.copy()
    shifted[:3, 3] += [60.0, -80.0, 40.0]
    run = write_bold(tmp_path, random_bold(20), affine=shifted)
    _assert_bad(_bad(tmp_path, grid, run), run.path.name, "field of view")


def test_mask_on_another_grid(tmp_path, grid):
    mask, _, _ = grid
    coarse = np.diag([3.0, 3.0, 3.0, 1.0])
    run = write_bold(tmp_path, random_bold(20), mask=mask[::2, ::2, ::2], mask_affine=coarse)
    # only what differs is named (shape and voxel size here; the origin is the same)
    _assert_bad(_bad(tmp_path, grid, run), run.path.name, "brain mask", "another grid",
                "shape (7, 9, 6) vs", "voxel size (3x3x3 mm) vs (2x2x2 mm)")


def test_missing_confounds_when_asked(tmp_path, grid):
    run = write_bold(tmp_path, random_bold(20))
    _assert_bad(_bad(tmp_path, grid, run, prep=PrepConfig(confounds="simple")),
                run.path.name, "no confounds file")


def test_no_repetition_time_when_resampling_in_time(tmp_path, grid):
    run = replace(write_bold(tmp_path, random_bold(20), tr=0.0), tr=None, tr_source="missing")
    _assert_bad(_bad(tmp_path, grid, run, prep=PrepConfig(target_tr=1.0)), run.path.name,
                "no repetition time")


def test_unwritable_cache_is_an_output_error(tmp_path, grid):
    mask, geometry, template = grid
    run = write_bold(tmp_path / "bids", random_bold(20))
    (tmp_path / "out" / "cache").mkdir(parents=True)
    (tmp_path / "out" / "cache" / "sub-01").write_text("not a folder")
    with pytest.raises(OutputError) as excinfo:
        prepare_run(run, geometry, template, None, tmp_path / "out", window=WINDOW)
    assert excinfo.value.exit_code == 73 and run.path.name in str(excinfo.value)


def test_prepare_runs_keeps_going_past_a_bad_run(tmp_path, grid, caplog):
    mask, geometry, template = grid
    good1 = write_bold(tmp_path / "bids", random_bold(20), subject="01")
    bad = write_bold(tmp_path / "bids", random_bold(20), subject="02")
    bad.path.write_bytes(bad.path.read_bytes()[:500])
    good2 = write_bold(tmp_path / "bids", random_bold(20, seed=9), subject="03")
    with caplog.at_level(logging.INFO, logger="bids_roimae.io.preparation"):
        entries, failures = prepare_runs([good1, bad, good2], geometry, template, None,
                                         tmp_path / "out", window=WINDOW)
    assert [e.subject for e in entries] == ["01", "03"]
    assert len(failures) == 1 and failures[0][0] is bad
    assert isinstance(failures[0][1], AppError) and failures[0][1].exit_code == 65
    skipped = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(skipped) == 1 and bad.path.name in skipped[0] and "\n" not in skipped[0]
