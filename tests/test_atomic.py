"""Atomic writes: complete files only, temporary files next to the target and cleaned up."""

from __future__ import annotations

import pytest

from bids_roimae.io import atomic


def test_write_text_and_bytes_replace_the_file(tmp_path):
    path = tmp_path / "sub" / "a.tsv"
    assert atomic.write_text(path, "x\ty\n") == path
    assert path.read_text() == "x\ty\n"
    atomic.write_bytes(path, b"new", fsync=False)
    assert path.read_bytes() == b"new"
    assert [p.name for p in path.parent.iterdir()] == ["a.tsv"]


def test_failed_write_keeps_the_old_file_and_removes_the_temporary(tmp_path):
    path = tmp_path / "a.json"
    path.write_text("old")

    def broken(tmp):
        tmp.write_text("half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        atomic.write_via(path, broken)
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_temporary_names_are_hidden_marked_and_unique(tmp_path):
    path = tmp_path / "img.nii.gz"
    a, b = atomic.tmp_path(path), atomic.tmp_path(path)
    assert a != b and a.parent == b.parent == tmp_path
    assert a.name.startswith(".") and atomic.TMP_MARK in a.name
    kept = atomic.tmp_path(path, keep_suffix=True)
    assert kept.name.startswith(".") and kept.name.endswith(".img.nii.gz")
