"""BIDS discovery over small fMRIPrep-like trees written in tmp_path."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from bids_roimae.errors import BadDataError, MissingInputError, NoDataSelected, UsageError
from bids_roimae.io.discovery import (
    discover,
    find_derivatives,
    load_filter_file,
    normalise_labels,
    read_participants,
)

SPACE = "MNI152NLin2009cAsym"
AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])


def _nifti(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.zeros((13, 17, 11, 3), np.float32), AFFINE), path)


def _json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def _description(folder: Path, **extra) -> None:
    data = {"Name": "fMRIPrep outputs", "BIDSVersion": "1.4.0", "DatasetType": "derivative",
            "GeneratedBy": [{"Name": "fMRIPrep", "Version": "23.2.0"}]}
    data.update(extra)
    _json(folder / "dataset_description.json", data)


def add_run(deriv: Path, prefix: str, *, space=SPACE, res="2", tr=2.0, mask=True,
            confounds=True, ext=".nii.gz") -> Path:
    """Write one fMRIPrep BOLD run; ``prefix`` is e.g. ``sub-01_ses-1_task-rest_run-1``."""
    entities = dict(p.split("-", 1) for p in prefix.split("_"))
    folder = deriv / f"sub-{entities['sub']}"
    if "ses" in entities:
        folder = folder / f"ses-{entities['ses']}"
    folder = folder / "func"
    space_part = f"_space-{space}" if space else ""
    res_part = f"_res-{res}" if res else ""
    bold = folder / f"{prefix}{space_part}{res_part}_desc-preproc_bold{ext}"
    _nifti(bold)
    if tr is not None:
        _json(bold.with_name(bold.name.split(".")[0] + ".json"), {"RepetitionTime": tr})
    if mask:
        _nifti(folder / f"{prefix}{space_part}{res_part}_desc-brain_mask{ext}")
    if confounds:
        source = "_".join(p for p in prefix.split("_") if not p.startswith("echo-"))
        (folder / f"{source}_desc-confounds_timeseries.tsv").write_text("global_signal\n0\n")
    return bold


@pytest.fixture()
def dataset(tmp_path):
    """Raw BIDS root with derivatives/fmriprep: two subjects, sessions, tasks and runs."""
    bids_dir = tmp_path / "bids"
    _json(bids_dir / "dataset_description.json", {"Name": "raw", "BIDSVersion": "1.10.0"})
    (bids_dir / "participants.tsv").write_text(
        "participant_id\t age \tdiagnosis\nsub-01\t10\tADHD\nsub-02\tn/a\tTDC\n")
    deriv = bids_dir / "derivatives" / "fmriprep"
    _description(deriv)
    add_run(deriv, "sub-01_ses-1_task-rest_run-1")
    add_run(deriv, "sub-01_ses-1_task-rest_run-2")
    add_run(deriv, "sub-01_ses-2_task-rest_run-1")
    add_run(deriv, "sub-01_ses-1_task-nback_acq-mb4_run-01", tr=0.8)
    add_run(deriv, "sub-01_ses-1_task-rest_run-1", space="T1w", res=None)
    add_run(deriv, "sub-02_ses-1_task-rest_run-1", tr=None)  # TR only in the raw root
    _json(bids_dir / "task-rest_bold.json", {"RepetitionTime": 2.5, "TaskName": "rest"})
    (deriv / "sub-01" / "figures").mkdir()
    (deriv / "sub-01" / "figures" / "sub-01_desc-carpet_bold.svg").write_text("<svg/>")
    return bids_dir


def test_normalise_labels_strips_prefix_splits_and_dedupes():
    assert normalise_labels(["sub-01 02", "03,sub-01", "  "], "sub") == ["01", "02", "03"]
    assert normalise_labels("ses-1", "ses-") == ["1"]
    assert normalise_labels(None, "task") == []
    with pytest.raises(UsageError):
        normalise_labels(["01_x"], "sub")


def test_discover_finds_runs_with_companions_and_tr(dataset):
    runs = discover(dataset)
    keys = [r.key for r in runs]
    assert keys == [
        "sub-01_ses-1_task-nback_acq-mb4_run-01",
        "sub-01_ses-1_task-rest_run-1",
        "sub-01_ses-1_task-rest_run-2",
        "sub-01_ses-2_task-rest_run-1",
        "sub-02_ses-1_task-rest_run-1",
    ]
    nback = runs[0]
    assert (nback.subject, nback.session, nback.task, nback.run) == ("01", "1", "nback", "01")
    assert nback.entities["acquisition"] == "mb4" and nback.entities["res"] == "2"
    assert nback.entities["space"] == SPACE and nback.space == SPACE
    assert nback.tr == pytest.approx(0.8) and nback.tr_source == "sidecar"
    assert nback.mask_path.name == (
        "sub-01_ses-1_task-nback_acq-mb4_run-01_space-MNI152NLin2009cAsym_res-2_desc-brain_mask.nii.gz")
    assert nback.confounds_path.name == (
        "sub-01_ses-1_task-nback_acq-mb4_run-01_desc-confounds_timeseries.tsv")
    assert all(r.path.is_file() and r.path.is_absolute() for r in runs)
    assert all(r.entities["space"] == SPACE for r in runs)  # T1w run left out
    # inherited from the raw root's task-rest_bold.json
    assert runs[-1].tr == pytest.approx(2.5) and runs[-1].tr_source == "sidecar"


def test_filters_by_labels_and_filter_file(dataset, tmp_path):
    runs = discover(dataset, participant_labels=["sub-01"], session_labels="ses-1",
                    task_labels=["rest"])
    assert [r.key for r in runs] == ["sub-01_ses-1_task-rest_run-1", "sub-01_ses-1_task-rest_run-2"]
    filter_file = tmp_path / "filter.json"
    filter_file.write_text(json.dumps({"bold": {"session": ["2", "1"], "acquisition": None,
                                                "run": 1}}))
    filters = load_filter_file(filter_file)
    runs = discover(dataset, bids_filters=filters)
    # acquisition null drops the acq-mb4 run; run 1 matches run-1 and not run-2
    assert [r.key for r in runs] == ["sub-01_ses-1_task-rest_run-1", "sub-01_ses-2_task-rest_run-1",
                                     "sub-02_ses-1_task-rest_run-1"]
    with pytest.raises(NoDataSelected):
        discover(dataset, bids_filters={"bold": {"session": "9"}})


@pytest.mark.parametrize("content", ["{not json", '{"bold": {"spacex": "1"}}', '["bold"]',
                                     '{"bold": {"space": "T1w"}}', '{"bold": {"run": true}}'])
def test_bad_filter_files_are_usage_errors(tmp_path, content):
    path = tmp_path / "f.json"
    path.write_text(content)
    with pytest.raises(UsageError):
        load_filter_file(path)


def test_unknown_participant_names_the_labels(dataset):
    with pytest.raises(NoDataSelected, match="07, 99") as info:
        discover(dataset, participant_labels=["01", "07", "sub-99"])
    assert info.value.exit_code == 18


def test_only_other_spaces_is_bad_data(dataset):
    with pytest.raises(BadDataError, match=r"only in spaces MNI152NLin2009cAsym, T1w.*"
                                           r"--output-spaces MNI152NLin6Asym:res-2") as info:
        discover(dataset, space="MNI152NLin6Asym")
    assert info.value.exit_code == 65


def test_resolution_preference_and_optional_res(tmp_path):
    deriv = tmp_path / "fmriprep"
    _description(deriv)
    add_run(deriv, "sub-01_task-rest", res="1")
    add_run(deriv, "sub-01_task-rest", res="2")
    add_run(deriv, "sub-02_task-rest", res=None, ext=".nii", confounds=False)
    add_run(deriv, "sub-03_task-rest", res="1", mask=False)
    runs = discover(deriv)  # BIDS_DIR is the derivatives dataset itself
    assert [(r.subject, r.entities.get("res")) for r in runs] == [("01", "2"), ("02", None),
                                                                  ("03", "1")]
    assert runs[1].path.suffix == ".nii" and runs[1].mask_path.suffix == ".nii"
    assert runs[1].confounds_path is None and runs[2].mask_path is None
    assert runs[0].key == "sub-01_task-rest" and runs[0].run is None and runs[0].session is None


def test_echo_entities_and_legacy_names(tmp_path):
    deriv = tmp_path / "fmriprep"
    _description(deriv)
    for echo in ("1", "2"):
        add_run(deriv, f"sub-01_task-rest_run-1_echo-{echo}")
    legacy = add_run(deriv, "sub-02_task-rest", res=None, mask=False, confounds=False)
    _nifti(legacy.parent / f"sub-02_task-rest_space-{SPACE}_label-brain_mask.nii.gz")
    (legacy.parent / "sub-02_task-rest_desc-confounds_regressors.tsv").write_text("a\n1\n")
    runs = discover(deriv)
    assert [r.key for r in runs] == ["sub-01_task-rest_run-1_echo-1",
                                     "sub-01_task-rest_run-1_echo-2", "sub-02_task-rest"]
    assert runs[0].entities["echo"] == "1"
    assert runs[0].confounds_path.name == "sub-01_task-rest_run-1_desc-confounds_timeseries.tsv"
    assert runs[2].mask_path.name.endswith("_label-brain_mask.nii.gz")
    assert runs[2].confounds_path.name.endswith("_desc-confounds_regressors.tsv")


def test_tr_inheritance_prefers_nearest_sidecar_and_reports_missing(tmp_path):
    deriv = tmp_path / "fmriprep"
    _description(deriv)
    add_run(deriv, "sub-01_task-rest", tr=None)
    add_run(deriv, "sub-02_task-rest", tr=1.5)
    add_run(deriv, "sub-03_task-motor", tr=None)
    _json(deriv / f"task-rest_space-{SPACE}_desc-preproc_bold.json", {"RepetitionTime": 3.0})
    runs = {r.subject: r for r in discover(deriv)}
    assert runs["01"].tr == pytest.approx(3.0)
    assert runs["02"].tr == pytest.approx(1.5)  # the file's own sidecar overrides the top level
    assert runs["03"].tr is None and runs["03"].tr_source == "missing"


def test_find_derivatives_errors_and_alternatives(tmp_path, dataset):
    with pytest.raises(MissingInputError):
        find_derivatives(tmp_path / "absent", None)
    empty = tmp_path / "raw"
    _json(empty / "dataset_description.json", {"Name": "raw", "BIDSVersion": "1.10.0"})
    with pytest.raises(MissingInputError, match="derivatives"):
        find_derivatives(empty, None)
    # a derivatives folder holding fmriprep/ is accepted for --derivatives
    found = find_derivatives(empty, dataset / "derivatives")
    assert found == (dataset / "derivatives" / "fmriprep").absolute()
    # legacy description without DatasetType but naming fMRIPrep
    legacy = tmp_path / "legacy"
    _json(legacy / "dataset_description.json",
          {"Name": "x", "BIDSVersion": "1.1.1", "PipelineDescription": {"Name": "fMRIPrep"}})
    assert find_derivatives(legacy, None) == legacy.absolute()


def test_fmriprep_folder_without_description_says_how_to_fix(dataset):
    (dataset / "derivatives" / "fmriprep" / "dataset_description.json").unlink()
    with pytest.raises(MissingInputError, match=r"no dataset_description\.json.*Add") as info:
        discover(dataset)
    assert info.value.exit_code == 66


def test_database_is_reused_and_rebuilt_when_subjects_change(dataset, tmp_path):
    db = tmp_path / "db"
    first = discover(dataset, database_dir=db)
    index = next(db.glob("fmriprep-*/layout_index.sqlite"))
    stamp = index.stat().st_mtime_ns
    second = discover(dataset, database_dir=db)
    assert [r.path for r in second] == [r.path for r in first]
    assert [r.tr for r in second] == [r.tr for r in first]
    assert index.stat().st_mtime_ns == stamp  # loaded, not rebuilt
    assert not [p for p in db.iterdir() if p.name.startswith(".")]  # no private leftovers
    add_run(dataset / "derivatives" / "fmriprep", "sub-03_ses-1_task-rest_run-1")
    third = discover(dataset, database_dir=db, participant_labels=["03"])
    assert [r.key for r in third] == ["sub-03_ses-1_task-rest_run-1"]


def test_read_participants(dataset, tmp_path):
    table = read_participants(dataset)
    assert list(table.index) == ["01", "02"]
    assert list(table.columns) == ["participant_id", "age", "diagnosis"]
    assert table.loc["02", "age"] == "n/a" and table.loc["01", "diagnosis"] == "ADHD"
    with pytest.raises(MissingInputError):
        read_participants(tmp_path)
    (tmp_path / "participants.tsv").write_text("participant_id\tage\nsub-01\t1\n01\t2\n")
    with pytest.raises(BadDataError, match="01"):
        read_participants(tmp_path)
