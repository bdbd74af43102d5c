"""BIDS derivative writing: names, atomic JSON/NIfTI, dataset description, validator."""

from __future__ import annotations

import json
import multiprocessing
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from bids_roimae.errors import OutputError
from bids_roimae.io.bids_names import derivative_path
from bids_roimae.io.derivatives import (
    ensure_output_dir,
    save_image,
    write_atlas_files,
    write_bidsignore,
    write_dataset_description,
    write_json,
    write_sidecar,
)

SPACE = "MNI152NLin2009cAsym"
AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])
# entities as bids.discover reports them for a preprocessed BOLD file
SOURCE = {"subject": "01", "session": "1", "task": "rest", "acquisition": "mb4", "run": "01",
          "echo": "2", "space": SPACE, "res": "2", "desc": "preproc", "suffix": "bold",
          "extension": ".nii.gz", "datatype": "func"}


def _image(dtype=np.float32) -> nib.Nifti1Image:
    data = np.arange(13 * 17 * 11, dtype=np.float64).reshape(13, 17, 11) % 7
    img = nib.Nifti1Image(data.astype(dtype), AFFINE)
    img.header.set_xyzt_units("mm", "sec")
    return img


def test_derivative_path_orders_entities_like_the_schema(tmp_path):
    path = derivative_path(tmp_path, SOURCE, suffix="boldmap", extension=".nii.gz", desc="ig",
                           stat="attribution", res="2", atlas="AAL3", space=SPACE)
    assert path == tmp_path / "sub-01" / "ses-1" / "func" / (
        "sub-01_ses-1_task-rest_acq-mb4_run-01_echo-2_space-MNI152NLin2009cAsym_atlas-AAL3_"
        "res-2_stat-attribution_desc-ig_boldmap.nii.gz")
    # the source's space/res/desc are not carried over; None removes a source entity
    bare = derivative_path(tmp_path, SOURCE, suffix="stats", extension=".tsv", run=None, echo=None)
    assert bare.name == "sub-01_ses-1_task-rest_acq-mb4_stats.tsv"
    short_keys = derivative_path(tmp_path, {"sub": "02", "task": "rest", "run": 3},
                                 suffix="mask", extension=".nii", desc="brain", datatype="anat")
    assert short_keys == tmp_path / "sub-02" / "anat" / "sub-02_task-rest_run-3_desc-brain_mask.nii"


@pytest.mark.parametrize("source, kwargs", [
    ({"subject": "01_x"}, {}),
    ({"subject": "01"}, {"desc": "a-b"}),
    ({"subject": "01"}, {"space": "../etc"}),
    ({"subject": "01", "session": "1 2"}, {}),
    ({"subject": "01"}, {"suffix": "bold map"}),
    ({"subject": "01"}, {"extension": "nii"}),
    ({"subject": "01"}, {"extension": ".nii/.."}),
    ({"subject": "01"}, {"foo": "bar"}),
    ({"task": "rest"}, {}),
])
def test_derivative_path_refuses_bad_labels(tmp_path, source, kwargs):
    args = {"suffix": "boldmap", "extension": ".nii.gz"}
    args.update(kwargs)
    with pytest.raises(ValueError):
        derivative_path(tmp_path, source, **args)


def test_write_json_is_sorted_plain_and_leaves_no_temp(tmp_path):
    path = write_json(tmp_path / "a" / "x.json", {"b": np.float32(1.5),
                                                  "a": [np.int64(2), float("nan")],
                                                  "c": np.arange(2), "d": tmp_path})
    text = path.read_text()
    assert text.index('"a"') < text.index('"b"') and text.endswith("}\n")
    assert json.loads(text) == {"a": [2, None], "b": 1.5, "c": [0, 1], "d": str(tmp_path)}
    assert [p.name for p in path.parent.iterdir()] == ["x.json"]


def test_save_image_writes_image_and_sidecar_atomically(tmp_path):
    img = _image()
    for name in ("sub-01_desc-x_boldmap.nii.gz", "sub-01_desc-y_boldmap.nii"):
        path = save_image(img, tmp_path / "func" / name, {"Units": "a.u.", "Steps": np.int64(3)})
        back = nib.load(path)
        assert back.shape == (13, 17, 11)
        assert np.array_equal(np.asanyarray(back.dataobj), np.asanyarray(img.dataobj))
        sidecar = path.with_name(name.split(".")[0] + ".json")
        assert json.loads(sidecar.read_text()) == {"Steps": 3, "Units": "a.u."}
    assert write_sidecar(tmp_path / "t_stats.tsv", None).name == "t_stats.json"
    assert not [p for p in (tmp_path / "func").iterdir() if p.name.startswith(".")]


def _describe(args):
    output_dir, i = args
    for j in range(15):  # alternate contents so replacements really happen
        write_dataset_description(output_dir, source_datasets=["/data/bids"],
                                  name=f"run {(i + j) % 2}")
    return i


def test_dataset_description_from_concurrent_processes_is_valid(tmp_path):
    # spawn, not fork: a test worker already runs threads (torch, execnet), and a child
    # forked while one of them holds a lock can hang forever
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        assert sorted(pool.map(_describe, [(tmp_path, i) for i in range(8)])) == list(range(8))
    data = json.loads((tmp_path / "dataset_description.json").read_text())
    assert data["DatasetType"] == "derivative" and data["BIDSVersion"] == "1.10.0"
    assert data["Name"] in ("run 0", "run 1")
    assert data["SourceDatasets"] == [{"URL": "file:///data/bids"}]
    assert data["GeneratedBy"][0]["Name"] == "bids_roimae" and data["GeneratedBy"][0]["Version"]
    assert [p.name for p in tmp_path.iterdir()] == ["dataset_description.json"]


def test_dataset_description_container_and_unchanged_file(tmp_path, monkeypatch):
    for var in ("APPTAINER_CONTAINER", "SINGULARITY_CONTAINER"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("BIDS_ROIMAE_CONTAINER_TYPE", "docker")
    monkeypatch.setenv("BIDS_ROIMAE_CONTAINER_TAG", "bidsroimae/bids_roimae:0.1.0")
    path = write_dataset_description(tmp_path, source_datasets=["file:///x", "/data/fmriprep"])
    data = json.loads(path.read_text())
    assert data["GeneratedBy"][0]["Container"] == {"Type": "docker",
                                                   "Tag": "bidsroimae/bids_roimae:0.1.0"}
    assert data["SourceDatasets"][0] == {"URL": "file:///x"}
    inode, mtime = path.stat().st_ino, path.stat().st_mtime_ns
    write_dataset_description(tmp_path, source_datasets=["file:///x", "/data/fmriprep"])
    assert (path.stat().st_ino, path.stat().st_mtime_ns) == (inode, mtime)  # left as it was
    monkeypatch.setenv("APPTAINER_CONTAINER", "/images/bids_roimae_0.1.0.sif")
    monkeypatch.delenv("BIDS_ROIMAE_CONTAINER_TAG")
    data = json.loads(write_dataset_description(tmp_path, source_datasets=[]).read_text())
    assert data["GeneratedBy"][0]["Container"] == {"Type": "apptainer",
                                                   "Tag": "bids_roimae_0.1.0.sif"}


def test_container_provenance_records_the_built_tag_and_the_running_engine(tmp_path,
                                                                           monkeypatch):
    from bids_roimae.io import derivatives

    for var in ("APPTAINER_CONTAINER", "SINGULARITY_CONTAINER", "BIDS_ROIMAE_CONTAINER_TYPE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("BIDS_ROIMAE_CONTAINER_TAG", "localhost/bids_roimae:smoke-cpu")
    podman = tmp_path / ".containerenv"
    podman.write_text("")
    monkeypatch.setattr(derivatives, "CONTAINER_MARKERS",
                        (("podman", podman), ("docker", tmp_path / "absent")))
    assert derivatives.container_provenance() == {"Type": "podman",
                                                  "Tag": "localhost/bids_roimae:smoke-cpu"}
    monkeypatch.setenv("APPTAINER_CONTAINER", "/images/roimae.sif")
    assert derivatives.container_provenance() == {
        "Type": "apptainer", "Tag": "localhost/bids_roimae:smoke-cpu",
        "URI": "file:///images/roimae.sif"}


def test_bidsignore_merges_and_drops_trailing_slash(tmp_path):
    (tmp_path / ".bidsignore").write_text("*.html\nextra\n")
    path = write_bidsignore(tmp_path, ["models/", "*.html", "cache", " logs/ ", "models"])
    assert path.read_text().splitlines() == ["*.html", "extra", "models", "cache", "logs"]
    with pytest.raises(ValueError):
        write_bidsignore(tmp_path, ["a\nb"])


def test_write_atlas_files(tmp_path):
    labels = nib.Nifti1Image(np.asanyarray(_image(np.float32).dataobj), AFFINE)  # float but whole
    table = pd.DataFrame({"name": ["B", "A"], "index": [2, 1], "system": ["limbic", "frontal"],
                          "extra": [0, 0]})
    paths = write_atlas_files(tmp_path, "AAL3", labels, table, SPACE, 2)
    assert paths["image"].name == "space-MNI152NLin2009cAsym_atlas-AAL3_res-2_dseg.nii.gz"
    img = nib.load(paths["image"])
    assert img.get_data_dtype() == np.int16 and img.shape == (13, 17, 11)
    assert np.array_equal(np.asanyarray(img.dataobj), np.asanyarray(labels.dataobj).astype(int))
    assert json.loads(paths["sidecar"].read_text())["Space"] == SPACE
    written = pd.read_csv(paths["table"], sep="\t")
    assert list(written.columns) == ["index", "name", "system"] and list(written["index"]) == [1, 2]
    with pytest.raises(ValueError):
        write_atlas_files(tmp_path, "AAL3", nib.Nifti1Image(np.full((2, 3, 4), 0.5), AFFINE),
                          table, SPACE, 2)
    with pytest.raises(ValueError):
        write_atlas_files(tmp_path, "AAL 3", labels, table, SPACE, 2)


def test_ensure_output_dir(tmp_path):
    assert ensure_output_dir(tmp_path / "a" / "b").is_dir()
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError) as info:
        ensure_output_dir(tmp_path / "file" / "out")
    assert info.value.exit_code == 73


def _validate(root: Path) -> tuple[int, list]:
    validator = Path(sys.executable).with_name("bids-validator-deno")
    proc = subprocess.run([str(validator), str(root), "--format", "json"],
                          capture_output=True, text=True, timeout=120)
    issues = json.loads(proc.stdout)["issues"]["issues"]
    return proc.returncode, [(i["code"], i.get("location")) for i in issues
                             if i["severity"] == "error"]


def test_output_tree_passes_bids_validator(tmp_path):
    out = ensure_output_dir(tmp_path / "out")
    write_dataset_description(out, source_datasets=[str(tmp_path / "bids")])
    (out / "README.md").write_text("bids_roimae outputs of a test.\n")
    labels = nib.Nifti1Image(np.asanyarray(_image(np.int16).dataobj), AFFINE)
    table = pd.DataFrame({"index": [1, 2], "name": ["A", "B"], "system": ["x", "y"]})
    write_atlas_files(out, "AAL3", labels, table, SPACE, 2)
    meta = {"Description": "test map", "Resolution": "2 mm"}
    boldmap = save_image(_image(), derivative_path(out, SOURCE, suffix="boldmap",
                                                   extension=".nii.gz", space=SPACE, res=2,
                                                   stat="attribution", desc="ig"), meta)
    save_image(labels, derivative_path(out, SOURCE, suffix="dseg", extension=".nii.gz", space=SPACE,
                                       atlas="AAL3", res=2, desc="fidelity"), meta)
    stats = derivative_path(out, SOURCE, suffix="stats", extension=".tsv", atlas="AAL3",
                            stat="attribution")
    stats.write_text("index\tname\tvalue\n1\tA\t0.5\n")
    write_sidecar(stats, {"Description": "region table"})
    (boldmap.parent / (boldmap.name.split(".")[0] + ".svg")).write_text("<svg/>")
    (out / "sub-01.html").write_text("<html/>")
    for folder in ("models/roimae/logs", "cache/sub-01/ses-1", "logs"):
        (out / folder).mkdir(parents=True)
        (out / folder / "x.txt").write_text("x")
    rc, errors = _validate(out)
    assert rc != 0 and ("NOT_INCLUDED", "/" + str(boldmap.relative_to(out))) in errors
    write_bidsignore(out, ["cache/", "models/", "logs/", "*.html", "*.svg", "*.png",
                           "*_boldmap.*", "*_stat-*"])
    assert _validate(out) == (0, [])
