"""The brain-token cache: keys, hits, atomic writes, concurrent writers, int8 entries."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from grids import AFFINE, GRID, SPACE, WINDOW, template_grid

from bids_roimae.config import PrepConfig
from bids_roimae.core.geometry import build_geometry
from bids_roimae.io import cache, cache_keys
from bids_roimae.io.cache import CacheEntry, ScaledTokens, cache_root, load_entries, lookup
from bids_roimae.io.cache_keys import cache_key
from bids_roimae.io.discovery import BoldRun
from bids_roimae.io.preparation import prepare_run, prepare_runs


@pytest.fixture(scope="module")
def grid():
    return template_grid()


def make_run(folder: Path, subject="01", n_frames=20, seed=0, run=None) -> BoldRun:
    rng = np.random.default_rng(seed)
    data = (rng.uniform(500, 1500, GRID)[..., None]
            + rng.normal(0, 10, GRID + (n_frames,))).astype(np.float32)
    func = folder / f"sub-{subject}" / "func"
    func.mkdir(parents=True, exist_ok=True)
    run_ent = f"_run-{run}" if run else ""
    path = func / f"sub-{subject}_task-rest{run_ent}_space-{SPACE}_desc-preproc_bold.nii.gz"
    img = nib.Nifti1Image(data, AFFINE)
    img.header.set_zooms((2.0, 2.0, 2.0, 2.0))
    nib.save(img, path)
    return BoldRun(subject=subject, session=None, task="rest", run=run,
                   entities={"subject": subject, "task": "rest", **({"run": run} if run else {})},
                   path=path, mask_path=None,
                   confounds_path=None, tr=2.0, tr_source="sidecar", space=SPACE)


def entry_files(out: Path) -> list[str]:
    return sorted(p.name for p in cache_root(out).rglob("*") if p.is_file()
                  and cache_keys.HASH_INDEX_DIRNAME not in p.parts)


def test_second_prepare_is_a_cache_hit(tmp_path, grid, caplog):
    _, geometry, template = grid
    run = make_run(tmp_path / "bids")
    out = tmp_path / "out"
    assert lookup(out, run, geometry, PrepConfig(), SPACE) is None
    first = prepare_run(run, geometry, template, None, out, window=WINDOW)
    mtime = first.path.stat().st_mtime_ns
    meta_mtime = first.path.with_suffix(".json").stat().st_mtime_ns
    with caplog.at_level(logging.INFO, logger="bids_roimae.io.preparation"):
        second = prepare_run(run, geometry, template, None, out, window=WINDOW)
    assert second.path == first.path
    assert second.path.stat().st_mtime_ns == mtime
    assert second.path.with_suffix(".json").stat().st_mtime_ns == meta_mtime
    assert any("cached" in r.getMessage() for r in caplog.records)
    hit = lookup(out, run, geometry, PrepConfig(), SPACE)
    assert hit is not None and hit.path == first.path
    assert first.path.parent == cache_root(out) / "sub-01"
    assert first.path.name == f"sub-01_task-rest_{first.key}.npy" and len(first.key) == 12
    assert (hit.subject, hit.task, hit.run_key, hit.n_frames, hit.tr) == (
        "01", "rest", "sub-01_task-rest", 20, 2.0)
    # Asked for again with a longer window, the cached entry is refused like the source.
    with pytest.raises(Exception, match="shorter than one window"):
        prepare_run(run, geometry, template, None, out, window=40)


def test_settings_and_geometry_change_the_key(tmp_path, grid):
    mask, geometry, template = grid
    run = make_run(tmp_path / "bids")
    base = cache_key(run, geometry, PrepConfig(), SPACE)
    assert cache_key(run, geometry, PrepConfig(), SPACE) == base
    assert cache_key(run, geometry, PrepConfig(dtype="int8"), SPACE) != base
    assert cache_key(run, geometry, PrepConfig(target_tr=1.0), SPACE) != base
    assert cache_key(run, geometry, PrepConfig(), "MNI152NLin6Asym") != base
    other_geometry = build_geometry(mask, AFFINE, None, patch_size=2)
    assert cache_key(run, other_geometry, PrepConfig(), SPACE) != base
    # The same content under another run name keeps the content part, not the file name.
    out = tmp_path / "out"
    a = prepare_run(run, geometry, template, None, out, window=WINDOW)
    b = prepare_run(run, geometry, template, PrepConfig(dtype="int8"), out, window=WINDOW)
    assert a.path != b.path and a.path.exists() and b.path.exists()


def test_content_hash_memo_is_keyed_by_size_and_mtime(tmp_path, grid):
    _, geometry, _ = grid
    run = make_run(tmp_path / "bids")
    index = tmp_path / "index"
    key = cache_key(run, geometry, PrepConfig(), SPACE, index_dir=index)
    assert len(list(index.glob("*.json"))) == 1
    cache_keys.forget_digests()  # a new process: only the on-disk index remains
    st = run.path.stat()
    blob = bytearray(run.path.read_bytes())
    blob[-1] ^= 0xFF
    run.path.write_bytes(bytes(blob))
    os.utime(run.path, ns=(st.st_atime_ns, st.st_mtime_ns))
    # Same path, size and mtime: the recorded digest is reused without reading the file.
    assert cache_key(run, geometry, PrepConfig(), SPACE, index_dir=index) == key
    os.utime(run.path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert cache_key(run, geometry, PrepConfig(), SPACE, index_dir=index) != key


def test_leftover_temporaries_and_incomplete_entries_are_not_entries(tmp_path, grid):
    _, geometry, template = grid
    out = tmp_path / "out"
    good = prepare_run(make_run(tmp_path / "bids"), geometry, template, None, out,
                       window=WINDOW)
    folder = good.path.parent
    # A killed writer's leftovers, and a .npy whose meta never arrived.
    (folder / f"{good.path.name}.tmp-123-abcd").write_bytes(good.path.read_bytes())
    (folder / f"{good.path.with_suffix('.json').name}.tmp-123-abcd").write_text("{")
    orphan = folder / "sub-01_task-rest_run-2_0123456789ab.npy"
    np.save(orphan, np.zeros((20, geometry.n_tokens, 27), np.float16))
    half = folder / "sub-01_task-rest_run-3_0123456789ab.npy"
    np.save(half, np.zeros((20, geometry.n_tokens, 27), np.float16))
    half.with_suffix(".json").write_text('{"complete": false}')
    entries = load_entries(out, geometry)
    assert [e.path for e in entries] == [good.path]


def test_failed_write_leaves_nothing(tmp_path):
    target = tmp_path / "cache" / "sub-01" / "x_0123456789ab.npy"

    def explode(arr):
        arr[0] = 1
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError):
        cache.write_entry(target, (4, 3, 2), np.float16, explode, {"subject": "01"})
    assert list(target.parent.iterdir()) == []


def test_stale_temporaries_are_cleaned(tmp_path):
    old = tmp_path / "a.npy.tmp-1-aaaa"
    new = tmp_path / "b.npy.tmp-2-bbbb"
    old.write_bytes(b"x")
    new.write_bytes(b"x")
    os.utime(old, (0, 0))
    assert cache.remove_stale_temps(tmp_path) == 1
    assert not old.exists() and new.exists()


def test_temporaries_of_dead_writers_go_at_once_whatever_their_age(tmp_path):
    import subprocess
    import sys

    from bids_roimae.io import atomic

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    tag = atomic.host_tag()
    dead = tmp_path / f".a.npy{atomic.TMP_MARK}{proc.pid}-{tag}-0a0a0a0a"
    alive = tmp_path / f".b.npy{atomic.TMP_MARK}{os.getpid()}-{tag}-0b0b0b0b"
    remote = tmp_path / f".c.npy{atomic.TMP_MARK}{proc.pid}-000000-0c0c0c0c"
    for path in (dead, alive, remote):
        path.write_bytes(b"x")
    assert atomic.tmp_path(tmp_path / "d.npy").name.startswith(
        f".d.npy{atomic.TMP_MARK}{os.getpid()}-{tag}-")
    assert cache.remove_stale_temps(tmp_path) == 1
    assert not dead.exists() and alive.exists() and remote.exists()


def test_full_disk_is_enospc_naming_folder_and_space(tmp_path, monkeypatch):
    import errno

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full, raising=False)
    target = tmp_path / "cache" / "sub-01" / "x_0123456789ab.npy"
    with pytest.raises(OSError) as info:
        cache.write_entry(target, (40, 30, 27), np.float16, lambda arr: None, {})
    assert info.value.errno == errno.ENOSPC
    assert str(target.parent) in str(info.value) and "needs 0.1 MB" in str(info.value)
    assert list(target.parent.iterdir()) == []  # the partial file is gone


def test_load_entries_filters_geometry_settings_subjects(tmp_path, grid):
    mask, geometry, template = grid
    out = tmp_path / "out"
    r1 = make_run(tmp_path / "bids", subject="01")
    r2 = make_run(tmp_path / "bids", subject="02", seed=1)
    for run in (r1, r2):
        prepare_run(run, geometry, template, None, out, window=WINDOW)
    prepare_run(r1, geometry, template, PrepConfig(dtype="int8"), out, window=WINDOW)
    assert len(load_entries(out, geometry)) == 3
    assert {e.subject for e in load_entries(out, geometry, PrepConfig())} == {"01", "02"}
    only = load_entries(out, geometry, PrepConfig(dtype="int8"))
    assert [(e.subject, e.meta["prep"]["dtype"]) for e in only] == [("01", "int8")]
    assert [e.subject for e in load_entries(out, geometry, PrepConfig(),
                                            subjects=["sub-02"])] == ["02"]
    other = build_geometry(mask, AFFINE, None, patch_size=2)
    assert load_entries(out, other) == []
    assert load_entries(tmp_path / "nothing", geometry) == []


def test_changed_source_supersedes_older_entry(tmp_path, grid):
    _, geometry, template = grid
    out = tmp_path / "out"
    run = make_run(tmp_path / "bids", seed=0)
    old = prepare_run(run, geometry, template, None, out, window=WINDOW)
    os.utime(old.path, ns=(0, 10**9))  # written long ago
    run = make_run(tmp_path / "bids", seed=7)  # fMRIPrep rerun: same name, new content
    new = prepare_run(run, geometry, template, None, out, window=WINDOW)
    assert new.path != old.path
    assert [e.path for e in load_entries(out, geometry)] == [new.path]


def test_int8_entries_read_back_as_scaled_floats(tmp_path, grid):
    _, geometry, template = grid
    out = tmp_path / "out"
    run = make_run(tmp_path / "bids")
    f16 = prepare_run(run, geometry, template, None, out, window=WINDOW)
    i8 = prepare_run(run, geometry, template, PrepConfig(dtype="int8"), out, window=WINDOW)
    raw = np.load(i8.path, mmap_mode="r")
    assert raw.dtype == np.int8 and i8.meta["scale"] > 0
    tokens = i8.tokens()
    assert isinstance(tokens, ScaledTokens) and tokens.shape == f16.tokens().shape
    window = tokens[3:3 + WINDOW]
    assert window.dtype == np.float32 and window.shape == (WINDOW, geometry.n_tokens, 27)
    ref = f16.tokens()[3:3 + WINDOW].astype(np.float32)
    assert np.abs(window - ref).max() <= i8.meta["scale"] * 0.5 + 1e-2
    buf = np.empty((WINDOW, geometry.n_tokens, 27), np.float32)
    assert i8.window(3, WINDOW, out=buf) is buf
    np.testing.assert_array_equal(buf, window)
    np.testing.assert_allclose(f16.window(3, WINDOW), ref)
    with pytest.raises(IndexError):
        f16.window(15, WINDOW)


def test_concurrent_prepare_of_one_run_gives_one_valid_entry(tmp_path, grid):
    _, geometry, template = grid
    run = make_run(tmp_path / "bids", n_frames=60)
    bad = make_run(tmp_path / "bids", subject="02")
    bad.path.write_bytes(b"")
    out = tmp_path / "out"
    # Two worker processes prepare the same run at the same time; a bad run rides along.
    entries, failures = prepare_runs([run, run, bad], geometry, template, None, out,
                                     window=WINDOW, nprocs=2)
    assert len(entries) == 2 and entries[0].path == entries[1].path
    assert [(r.subject, e.exit_code) for r, e in failures] == [("02", 65)]
    assert entry_files(out) == sorted([entries[0].path.name,
                                       entries[0].path.with_suffix(".json").name])
    reference = prepare_run(run, geometry, template, None, tmp_path / "ref", window=WINDOW)
    np.testing.assert_array_equal(entries[0].tokens(), reference.tokens())
    assert isinstance(load_entries(out, geometry)[0], CacheEntry)
