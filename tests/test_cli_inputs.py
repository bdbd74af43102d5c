"""What a user sees for bad input through the CLI: one line, the right exit code, the other
runs still prepared."""

import json
import shutil
import tempfile

import nibabel as nib
import numpy as np
import pytest

from bids_roimae.cli import main

FAST = ["--patch-size", "3"]


@pytest.fixture
def dataset(small_dataset, tmp_path):
    """A private copy of the generated dataset that a test may damage."""
    root = tmp_path / "bids"
    shutil.copytree(small_dataset.root, root)
    return root


def _bold(root, sub):
    return (root / "derivatives" / "fmriprep" / f"sub-{sub}" / "func" /
            f"sub-{sub}_task-rest_space-MNI152NLin2009cAsym_res-2_desc-preproc_bold.nii.gz")


def _run(args, capsys):
    code = main([str(a) for a in args])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


def test_bad_runs_are_skipped_and_reported(dataset, tmp_path, capsys, monkeypatch):
    scratch = tmp_path / "tmp"  # where the run's own work folder goes without -w
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    _bold(dataset, "02").write_bytes(_bold(dataset, "02").read_bytes()[:5000])  # truncated
    bold3 = _bold(dataset, "03")
    img = nib.load(bold3)
    data = np.asanyarray(img.dataobj).astype(np.float32)
    data[6, 8, 5, 3] = np.nan  # the grid centre, inside the brain
    broken = nib.Nifti1Image(data, img.affine)
    broken.header.set_zooms(img.header.get_zooms())
    nib.save(broken, bold3)
    out = tmp_path / "out"
    code, err = _run([dataset, out, "participant", "--skip-bids-validation"] + FAST, capsys)
    assert code == 65
    bad = [line for line in err.splitlines() if "sub-02" in line or "sub-03" in line]
    assert any("sub-02" in line and ("truncated" in line or "corrupt" in line)
               for line in bad), err
    assert any("sub-03" in line and "NaN" in line for line in bad), err
    prepared = sorted(p.name.split("_")[0] for p in (out / "cache").rglob("*.npy"))
    assert prepared == ["sub-01", "sub-04", "sub-05", "sub-06"]
    assert not list(scratch.iterdir())  # the temporary work folder is gone, failure or not


def test_unknown_participant_is_18(dataset, tmp_path, capsys):
    code, err = _run([dataset, tmp_path / "out", "participant", "--participant_label", "77",
                      "--skip-bids-validation"], capsys)
    assert code == 18 and "77" in err


def test_filter_file_selecting_nothing_is_18(dataset, tmp_path, capsys):
    filters = tmp_path / "filters.json"
    filters.write_text(json.dumps({"bold": {"session": "99"}}))
    code, _ = _run([dataset, tmp_path / "out", "participant", "--bids-filter-file", filters,
                    "--skip-bids-validation"], capsys)
    assert code == 18


def test_invalid_bids_is_16_unless_skipped(dataset, tmp_path, capsys):
    (dataset / "dataset_description.json").unlink()
    (dataset / "sub-01" / "func" / "bogus_file.txt").write_text("x")
    code, err = _run([dataset, tmp_path / "out", "participant", "--participant_label", "01"]
                     + FAST, capsys)
    assert code == 16 and "--skip-bids-validation" in err


def test_fmriprep_without_description_is_66(dataset, tmp_path, capsys):
    (dataset / "derivatives" / "fmriprep" / "dataset_description.json").unlink()
    code, err = _run([dataset, tmp_path / "out", "participant", "--skip-bids-validation"],
                     capsys)
    assert code == 66 and "dataset_description.json" in err


def test_bold_only_in_another_space_is_65(dataset, tmp_path, capsys):
    for path in (dataset / "derivatives" / "fmriprep").rglob("*space-MNI152NLin2009cAsym*"):
        path.rename(path.with_name(path.name.replace("space-MNI152NLin2009cAsym_res-2",
                                                     "space-T1w")))
    code, err = _run([dataset, tmp_path / "out", "participant", "--skip-bids-validation"],
                     capsys)
    assert code == 65 and "T1w" in err


def test_unwritable_output_is_73(dataset, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    code, err = _run([dataset, blocker / "out", "participant", "--skip-bids-validation"],
                     capsys)
    assert code == 73 and "a_file" in err


def test_rerun_uses_the_cache_and_derivatives_as_bids_dir(dataset, tmp_path, capsys):
    out = tmp_path / "out"
    fmriprep = dataset / "derivatives" / "fmriprep"
    args = [fmriprep, out, "participant", "--participant-label", "sub-01", "-v"] + FAST
    assert _run(args, capsys)[0] == 0
    entry = next((out / "cache").rglob("*.npy"))
    before = entry.stat().st_mtime_ns
    code, err = _run(args, capsys)
    assert code == 0 and "cached" in err
    assert entry.stat().st_mtime_ns == before


def test_single_subject_fmriprep_folder_not_marked_derivative(dataset, tmp_path, capsys):
    """A one-subject dataset assembled from fMRIPrep outputs (as CBRAIN does) is used as
    the fMRIPrep folder, without raw BIDS validation."""
    single = tmp_path / "single"
    single.mkdir()
    shutil.copytree(dataset / "derivatives" / "fmriprep" / "sub-04", single / "sub-04")
    (single / "dataset_description.json").write_text(json.dumps(
        {"Name": "one subject", "BIDSVersion": "1.8.0"}))
    code, err = _run([single, tmp_path / "out", "participant", "--participant_label", "04"]
                     + FAST, capsys)
    assert code == 0, err
    assert "not marked DatasetType derivative" in err
    assert len(list((tmp_path / "out" / "cache").rglob("*.npy"))) == 1


def test_normalize_option_reaches_the_cache(small_dataset, tmp_path, capsys):
    """Each scaling is its own cache entry: the default global one, then --normalize voxel."""
    out = tmp_path / "out"
    base = [small_dataset.root, out, "participant", "--participant-label", "01",
            "--skip-bids-validation"] + FAST
    assert _run(base, capsys)[0] == 0
    assert _run(base + ["--normalize", "voxel"], capsys)[0] == 0
    metas = [json.loads(p.read_text()) for p in sorted((out / "cache").rglob("*.json"))
             if p.name.startswith("sub-01")]
    assert sorted(m["prep"]["normalize"] for m in metas) == ["global", "voxel"]
    assert sorted(m["normalize"] for m in metas) == ["global-psc", "voxel"]
