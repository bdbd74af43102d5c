"""The example-dataset generator: fMRIPrep layout, sidecars, participants, planted effect."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from bids_roimae.io.atlas import load_atlas, resample_labels
from bids_roimae.io.templates import load_template
from bids_roimae.synth.dataset import main as synth_main
from bids_roimae.synth.dataset import make_dataset

SPACE = "MNI152NLin2009cAsym"
FMRIPREP_FILE = re.compile(
    r"^(?P<ents>sub-[0-9A-Za-z]+(_ses-[0-9A-Za-z]+)?_task-[0-9A-Za-z]+(_run-\d+)?)_"
    r"(space-MNI152NLin2009cAsym_res-2_(desc-preproc_bold\.(nii\.gz|json)"
    r"|desc-brain_mask\.(nii\.gz|json)|boldref\.nii\.gz)"
    r"|desc-confounds_timeseries\.(tsv|json))$")
NEEDED = ("_space-MNI152NLin2009cAsym_res-2_desc-preproc_bold.nii.gz",
          "_space-MNI152NLin2009cAsym_res-2_desc-preproc_bold.json",
          "_space-MNI152NLin2009cAsym_res-2_desc-brain_mask.nii.gz",
          "_desc-confounds_timeseries.tsv", "_desc-confounds_timeseries.json")


def _bold_files(dataset) -> list[Path]:
    return sorted(Path(dataset).glob("derivatives/fmriprep/sub-*/func/*_desc-preproc_bold.nii.gz"))


def test_fmriprep_naming_and_descriptions(small_dataset):
    root = Path(small_dataset)
    func_files = sorted(p for p in (root / "derivatives" / "fmriprep").rglob("sub-*/func/*"))
    assert func_files
    for path in func_files:
        assert FMRIPREP_FILE.match(path.name), path.name
        assert path.parent.parent.name == path.name.split("_")[0]
    subjects = sorted(p.name for p in (root / "derivatives" / "fmriprep").glob("sub-*"))
    assert subjects == [f"sub-{i:02d}" for i in range(1, 7)]
    for sub in subjects:
        for suffix in NEEDED:
            assert (root / "derivatives/fmriprep" / sub / "func"
                    / f"{sub}_task-rest{suffix}").is_file(), (sub, suffix)
        assert (root / sub / "func" / f"{sub}_task-rest_bold.nii.gz").is_file()
    raw = json.loads((root / "dataset_description.json").read_text())
    deriv = json.loads((root / "derivatives/fmriprep/dataset_description.json").read_text())
    assert raw["DatasetType"] == "raw" and deriv["DatasetType"] == "derivative"
    assert deriv["GeneratedBy"][0]["Name"] == "fMRIPrep"
    assert "Planted group difference" in (root / "README").read_text()


def test_tr_in_sidecars_and_headers(small_dataset, resources):
    bold_files = _bold_files(small_dataset)
    assert len(bold_files) == 6 and [str(p) for p in bold_files] == sorted(
        small_dataset["bold_files"])
    for bold in bold_files:
        meta = json.loads(Path(str(bold).replace(".nii.gz", ".json")).read_text())
        assert meta["RepetitionTime"] == 2.0 and meta["TaskName"] == "rest"
        assert meta["SkullStripped"] is True
        img = nib.load(bold)
        assert img.shape == (13, 17, 11, 40)
        assert img.header.get_zooms() == (2.0, 2.0, 2.0, 2.0)
        np.testing.assert_allclose(img.affine, resources.affine)
        mask_path = Path(str(bold).replace("desc-preproc_bold", "desc-brain_mask"))
        brain = np.asarray(nib.load(mask_path).dataobj) > 0
        data = np.asarray(img.dataobj)
        assert (data[~brain] == 0).all() and (data[brain] > 0).all()
    sub = bold_files[0].name.split("_")[0]
    raw_meta = json.loads((Path(small_dataset) / sub / "func"
                           / f"{sub}_task-rest_bold.json").read_text())
    assert raw_meta["RepetitionTime"] == 2.0
    assert nib.load(Path(small_dataset) / sub / "func"
                    / f"{sub}_task-rest_bold.nii.gz").header.get_zooms()[3] == 2.0


def test_participants_use_adhd200_codes(small_dataset):
    table = pd.read_csv(Path(small_dataset) / "participants.tsv", sep="\t", dtype=str)
    assert list(table.columns) == ["participant_id", "dx", "site", "age", "sex"]
    assert set(table["dx"]) <= {"0", "1", "2", "3"}
    adhd = table[table["dx"] != "0"]
    assert len(adhd) == 3 and (table["dx"] == "0").sum() == 3
    assert sorted(adhd["participant_id"]) == sorted(small_dataset["adhd_subjects"])
    assert sorted(table.loc[table["dx"] == "0", "participant_id"]) == sorted(
        small_dataset["control_subjects"])
    assert table.groupby("dx", group_keys=False)["site"].nunique().max() >= 1
    for group in (table[table["dx"] == "0"], adhd):  # both sites in both groups
        assert set(group["site"]) == {"siteA", "siteB"}
    levels = json.loads((Path(small_dataset) / "participants.json").read_text())["dx"]["Levels"]
    assert set(levels) == {"0", "1", "2", "3"}


def test_nilearn_load_confounds_accepts_the_confounds(small_dataset):
    from nilearn.interfaces.fmriprep import load_confounds

    bold = str(_bold_files(small_dataset)[0])
    confounds, sample_mask = load_confounds(bold, strategy=("motion", "high_pass", "wm_csf"))
    assert confounds.shape[0] == 40 and sample_mask is None
    assert {"trans_x", "rot_z_derivative1_power2", "csf", "white_matter"} <= set(confounds)
    assert any(c.startswith("cosine") for c in confounds)
    assert not confounds.isna().any().any()
    table = pd.read_csv(bold.replace("space-MNI152NLin2009cAsym_res-2_desc-preproc_bold.nii.gz",
                                     "desc-confounds_timeseries.tsv"), sep="\t")
    flagged = set(np.flatnonzero((table["framewise_displacement"].fillna(0) > 0.5)
                                 | (table["std_dvars"].fillna(0) > 1.5)).tolist())
    assert flagged  # the generator puts a head-motion jump in every run
    confounds, sample_mask = load_confounds(
        bold, strategy=("scrub", "motion", "high_pass", "wm_csf"), scrub=0,
        fd_threshold=0.5, std_dvars_threshold=1.5)
    assert confounds.shape[0] == 40
    assert set(range(40)) - set(sample_mask.tolist()) == flagged
    confounds, _ = load_confounds(bold, strategy=("compcor", "high_pass", "global_signal"),
                                  compcor="anat_combined", n_compcor=3)
    assert {"a_comp_cor_00", "a_comp_cor_02", "global_signal"} <= set(confounds)


def test_planted_effect_is_measurable(small_dataset, resources):
    """Log amplitude of each region's mean signal (relative to the subject's median region):
    the ADHD - control difference is large in the planted regions and small elsewhere."""
    labels, _ = resample_labels(load_atlas(), load_template().mask_img)
    region_ids = [int(i) for i in np.unique(labels) if i]
    planted = [r["index"] for r in small_dataset["planted_regions"]]
    assert [r["name"] for r in small_dataset["planted_regions"]] == [
        "Hippocampus_L", "Cerebellum_Crus1_R"]
    amplitude = {}
    for bold in _bold_files(small_dataset):
        data = np.asarray(nib.load(bold).dataobj, dtype=np.float64)
        logs = {}
        for region in region_ids:
            mean_signal = data[labels == region].mean(0)
            logs[region] = np.log(mean_signal.std() / mean_signal.mean())
        median = np.median(list(logs.values()))
        amplitude[bold.name.split("_")[0]] = {r: v - median for r, v in logs.items()}
    difference = {r: np.mean([amplitude[s][r] for s in small_dataset["adhd_subjects"]])
                  - np.mean([amplitude[s][r] for s in small_dataset["control_subjects"]])
                  for r in region_ids}
    others = [abs(difference[r]) for r in region_ids if r not in planted]
    assert min(difference[r] for r in planted) > 0.45
    assert max(others) < min(difference[r] for r in planted)


@pytest.mark.parametrize("effect", ["amplitude", "coupling"])
def test_effect_plants_amplitude_or_coupling_alone(resources, effect):
    """The same noise drawn for an ADHD and a control run: ``amplitude`` scales the planted
    region's signal (its time course keeps its shape), ``coupling`` reshapes it (its
    amplitude stays)."""
    from bids_roimae.synth.signal import SignalGrid, simulate_run

    template, atlas = load_template(), load_atlas()
    labels, _ = resample_labels(atlas, template.mask_img)
    planted = int(atlas.table.set_index("name").loc["Cerebellum_Crus1_R", "index"])
    grid = SignalGrid(template, labels, atlas.table, [planted], np.random.default_rng(0))
    rows = grid.region_row == int(grid.planted_rows[0])
    series = {}
    for adhd in (False, True):
        data, _ = simulate_run(grid, np.random.default_rng(1), 400, 2.0, adhd, 0.5, 1.0, 0.0,
                               effect=effect)
        mean = data[rows].mean(0)
        series[adhd] = mean - mean.mean()
    ratio = series[True].std() / series[False].std()
    same_shape = np.corrcoef(series[True], series[False])[0, 1]
    if effect == "amplitude":
        assert ratio > 1.6 and same_shape > 0.97
    else:
        assert 0.8 < ratio < 1.25 and same_shape < 0.95  # theory: 0.91
    with pytest.raises(ValueError, match="effect must be"):
        simulate_run(grid, np.random.default_rng(1), 10, 2.0, True, 0.5, 1.0, 0.0,
                     effect="phase")


def test_raw_dataset_passes_the_bids_validator(small_dataset):
    validator = Path(sys.executable).parent / "bids-validator-deno"
    proc = subprocess.run([str(validator), str(Path(small_dataset)), "--json"],
                          capture_output=True, text=True, timeout=120)
    issues = json.loads(proc.stdout)["issues"]["issues"]
    errors = [i["code"] for i in issues if i["severity"] == "error"]
    assert errors == [] and proc.returncode == 0


def test_command_writes_sessions_and_runs(resources, tmp_path):
    out = tmp_path / "ds"
    with pytest.raises(SystemExit) as done:
        synth_main([str(out), "--n-subjects", "2", "--n-frames", "8", "--sessions", "2",
                    "--runs", "2", "--seed", "3", "--n-jobs", "2"])
    assert done.value.code == 0
    bolds = sorted(out.glob("derivatives/fmriprep/sub-*/ses-*/func/*_desc-preproc_bold.nii.gz"))
    assert [p.name.split("_space")[0] for p in bolds] == [
        f"sub-{s}_ses-{ses}_task-rest_run-{run}"
        for s in ("01", "02") for ses in (1, 2) for run in (1, 2)]
    manifest = json.loads((out / "code" / "synth_manifest.json").read_text())
    assert len(manifest["bold_files"]) == 8 and manifest["seed"] == 3
    assert (out / "sub-01" / "ses-2" / "func" / "sub-01_ses-2_task-rest_run-2_bold.json").is_file()


def test_same_seed_same_data_regardless_of_threads(resources, tmp_path):
    first = make_dataset(tmp_path / "a", n_subjects=2, n_frames=8, seed=5, n_jobs=1)
    second = make_dataset(tmp_path / "b", n_subjects=2, n_frames=8, seed=5, n_jobs=2)
    third = make_dataset(tmp_path / "c", n_subjects=2, n_frames=8, seed=6)
    for a, b, c in zip(first["bold_files"], second["bold_files"], third["bold_files"]):
        data_a = np.asarray(nib.load(a).dataobj)
        assert np.array_equal(data_a, np.asarray(nib.load(b).dataobj))
        assert not np.array_equal(data_a, np.asarray(nib.load(c).dataobj))


def test_falls_back_to_synthetic_resources_on_the_real_grid(tmp_path, monkeypatch):
    """No cache and no network: the demo writes its own template and atlas (97x115x97)."""
    monkeypatch.setenv("TEMPLATEFLOW_HOME", str(tmp_path / "tf_empty"))
    monkeypatch.setenv("NILEARN_DATA", str(tmp_path / "nl_empty"))
    for var in ("HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    out = tmp_path / "demo"
    manifest = make_dataset(out, n_subjects=2, n_frames=8)
    assert manifest["resources"]["synthetic"] is True
    assert manifest["grid_shape"] == [97, 115, 97]
    assert Path(manifest["resources"]["templateflow_home"]) == out / "sourcedata" / "templateflow"
    assert not (tmp_path / "tf_empty").exists() or not any((tmp_path / "tf_empty").rglob("*"))
    img = nib.load(manifest["bold_files"][0])
    assert img.shape == (97, 115, 97, 8)
    np.testing.assert_allclose(img.affine[:3, 3], (-96.5, -132.5, -78.5))
    assert (out / "sourcedata/nilearn_data/aal_3v2/AAL3/AAL3v1.xml").is_file()
    assert [r["name"] for r in manifest["planted_regions"]] == [
        "Hippocampus_L", "Cerebellum_Crus1_R"]
