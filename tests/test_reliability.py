"""The fault and bad-input matrix a demanding user tries (issue 13): for each case, the exit
code, one line without a traceback, the other runs processed and earlier outputs unchanged.

Runs through ``bids_roimae.cli.main`` in this process where it can (fast); signals, kills
and concurrent runs use subprocesses. Disk-full cases mount a small tmpfs, which needs
root; elsewhere they are skipped with the reason printed.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from bids_roimae.cli import main
from bids_roimae.io import atomic

FAST = ["--patch-size", "3", "--skip-bids-validation"]
TRAIN = FAST + ["--steps", "2", "--batch-size", "2", "--model-name", "m"]
SPACE = "space-MNI152NLin2009cAsym_res-2"


# -- fixtures and helpers --------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(resources, tmp_path_factory):
    """Three subjects of 24 frames (window 20) on the synthetic grid: made once."""
    from bids_roimae.synth.dataset import make_dataset

    root = tmp_path_factory.mktemp("reliability") / "bids"
    make_dataset(root, n_subjects=3, n_frames=24, tr=2.0, seed=3, n_sites=1)
    return root


@pytest.fixture
def bids(tiny, tmp_path):
    """A private copy a test may damage."""
    root = tmp_path / "bids"
    shutil.copytree(tiny, root)
    return root


@pytest.fixture(scope="module")
def pretrained(tiny, tmp_path_factory):
    """An output folder with a pretrained model (2 steps) over the three subjects."""
    out = tmp_path_factory.mktemp("pretrained") / "out"
    assert main([str(tiny), str(out), "group"] + TRAIN) == 0
    return out


def func(root, sub):
    return root / "derivatives" / "fmriprep" / f"sub-{sub}" / "func"


def bold(root, sub):
    return func(root, sub) / f"sub-{sub}_task-rest_{SPACE}_desc-preproc_bold.nii.gz"


def run_cli(args, capsys) -> tuple[int, str]:
    code = main([str(a) for a in args])
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return code, err


def error_line(err: str) -> str:
    """The one final error line; fails when there is none or several."""
    lines = [line for line in err.splitlines() if line.startswith("bids_roimae: ")]
    assert len(lines) == 1, err
    return lines[0]


def cached(out) -> list[str]:
    return sorted(p.name.split("_")[0] for p in (Path(out) / "cache").rglob("*.npy")
                  if atomic.TMP_MARK not in p.name)


def temporaries(folder) -> list[Path]:
    return [p for p in Path(folder).rglob(f"*{atomic.TMP_MARK}*")] if Path(folder).exists() \
        else []


def save_like(path, data, like):
    img = nib.Nifti1Image(data, like.affine)
    img.header.set_zooms(like.header.get_zooms()[:data.ndim])
    nib.save(img, path)


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def cli_cmd(*args) -> list[str]:
    return [sys.executable, "-m", "bids_roimae.cli", *map(str, args)]


def env() -> dict:
    return dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")


# -- bad runs: one line each, the others prepared --------------------------------------------

def _corrupt(root):
    bold(root, "02").write_bytes(os.urandom(4000))


def _empty(root):
    bold(root, "02").write_bytes(b"")


def _truncated(root):
    path = bold(root, "02")
    path.write_bytes(path.read_bytes()[:6000])


def _three_d(root):
    img = nib.load(bold(root, "02"))
    save_like(bold(root, "02"), np.asanyarray(img.dataobj)[..., 0].astype(np.float32), img)


def _nan(root):
    img = nib.load(bold(root, "02"))
    data = np.asanyarray(img.dataobj).astype(np.float32)
    data[6, 8, 5, :] = np.nan
    save_like(bold(root, "02"), data, img)


def _flat(root):
    img = nib.load(bold(root, "02"))
    save_like(bold(root, "02"), np.zeros(img.shape, np.float32), img)


def _short(root):
    img = nib.load(bold(root, "02"))
    save_like(bold(root, "02"), np.asanyarray(img.dataobj)[..., :8].astype(np.float32), img)


def _mask_origin(root):
    mask = func(root, "02") / f"sub-02_task-rest_{SPACE}_desc-brain_mask.nii.gz"
    img = nib.load(mask)
    affine = img.affine.copy()
    affine[:3, 3] += 4.0
    nib.save(nib.Nifti1Image(np.asanyarray(img.dataobj), affine, img.header), mask)


def _no_confounds(root):
    for path in func(root, "02").glob("*confounds_timeseries*"):
        path.unlink()


BAD_RUNS = {
    "corrupt": (_corrupt, [], "sub-02"),
    "empty": (_empty, [], "sub-02"),
    "truncated": (_truncated, [], "sub-02"),
    "3d": (_three_d, [], "3D"),
    "nan": (_nan, [], "NaN"),
    "flat": (_flat, [], "flat"),
    "short": (_short, [], "shorter than one window"),
    "mask-origin": (_mask_origin, [], "origin"),
    "no-confounds": (_no_confounds, ["--confounds", "simple"], "no confounds file"),
}


@pytest.mark.parametrize("case", sorted(BAD_RUNS))
def test_a_bad_run_is_65_and_the_others_are_prepared(case, bids, tmp_path, capsys):
    damage, options, words = BAD_RUNS[case]
    out = tmp_path / "out"
    assert run_cli([bids, out, "participant", "--participant-label", "01"] + FAST + options,
                   capsys)[0] == 0
    first = next((out / "cache").rglob("*.npy"))
    before = (first.read_bytes(), first.stat().st_mtime_ns)
    damage(bids)
    code, err = run_cli([bids, out, "participant"] + FAST + options, capsys)
    assert code == 65, err
    failures = [line for line in err.splitlines() if " ERROR " in line]
    assert len(failures) == 1 and "sub-02" in failures[0] and words in failures[0], err
    assert cached(out) == ["sub-01", "sub-03"]
    assert (first.read_bytes(), first.stat().st_mtime_ns) == before  # earlier output kept
    assert temporaries(out) == []


def test_subject_only_in_another_space_is_reported_by_name(bids, tmp_path, capsys):
    for path in func(bids, "03").iterdir():
        path.rename(path.with_name(path.name.replace(SPACE, "space-T1w")))
    code, err = run_cli([bids, tmp_path / "out", "participant"] + FAST, capsys)
    assert code == 0, err
    assert "sub-03: skipped, no preprocessed BOLD in space MNI152NLin2009cAsym (found only " \
           "T1w)" in err
    assert cached(tmp_path / "out") == ["sub-01", "sub-02"]


def test_selection_errors_keep_their_codes(bids, tmp_path, capsys):
    filters = tmp_path / "filters.json"
    filters.write_text(json.dumps({"bold": {"task": "nothing"}}))
    code, err = run_cli([bids, tmp_path / "out", "participant", "--bids-filter-file",
                         filters] + FAST, capsys)
    assert code == 18 and "nothing" in error_line(err)
    code, err = run_cli([bids, tmp_path / "out", "participant", "--participant-label",
                         "09"] + FAST, capsys)
    assert code == 18 and "09" in error_line(err)


# -- where outputs go, and names that become paths ------------------------------------------

def test_output_inside_fmriprep_is_refused_and_its_description_kept(bids, capsys):
    fmriprep = bids / "derivatives" / "fmriprep"
    description = (fmriprep / "dataset_description.json").read_bytes()
    for out in (fmriprep, fmriprep / "sub-01" / "mine"):
        code, err = run_cli([bids, out, "participant"] + FAST, capsys)
        assert code == 64 and "fMRIPrep derivatives" in error_line(err)
    assert (fmriprep / "dataset_description.json").read_bytes() == description
    assert not (fmriprep / "cache").exists()


def test_output_in_a_foreign_dataset_is_refused_but_derivatives_is_fine(bids, tmp_path,
                                                                         capsys):
    other = tmp_path / "other"
    other.mkdir()
    (other / "dataset_description.json").write_text('{"Name": "x", "BIDSVersion": "1.9.0"}')
    code, err = run_cli([bids, other, "participant"] + FAST, capsys)
    assert code == 64 and "not written by bids_roimae" in error_line(err)
    code, err = run_cli([bids, other / "sub-01", "participant"] + FAST, capsys)
    assert code == 64 and "is inside the dataset" in error_line(err)
    code, err = run_cli([bids, bids / "code" / "out", "participant"] + FAST, capsys)
    assert code == 64, err
    out = bids / "derivatives" / "bids_roimae"
    code, err = run_cli([bids, out, "participant", "--participant-label", "01"] + FAST,
                        capsys)
    assert code == 0, err
    # ... and its own dataset_description.json is ours: a second run may write there
    assert run_cli([bids, out, "participant", "--participant-label", "01"] + FAST,
                   capsys)[0] == 0


@pytest.mark.parametrize("option", [["--model-name", "../../escape"], ["--model-name", ".."],
                                    ["--model-name", "a/b"], ["--atlas", "AAL3_v2"],
                                    ["--atlas-desc", "../x"]])
def test_names_that_become_paths_must_be_one_component(option, bids, tmp_path, capsys):
    out = tmp_path / "deep" / "out"
    code, err = run_cli([bids, out, "group"] + FAST + option, capsys)
    assert code == 64 and option[0] in error_line(err)
    assert not out.exists() and not (tmp_path / "escape").exists()


def test_scratch_folder_that_cannot_be_made_is_73_naming_w(bids, tmp_path, capsys,
                                                           monkeypatch):
    # a read-only container without a writable /tmp: mkdtemp fails
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "no" / "such" / "tmp"))
    code, err = run_cli([bids, tmp_path / "out", "participant"] + FAST, capsys)
    assert code == 73 and "-w" in error_line(err)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, err = run_cli([bids, tmp_path / "out", "participant", "-w", blocker / "work"]
                        + FAST, capsys)
    assert code == 73 and "-w" in error_line(err) and str(blocker) in err


# -- atlases: refused before any preparation -------------------------------------------------

def _atlas(tmp_path, name, data, resources, affine=None):
    path = tmp_path / name
    nib.save(nib.Nifti1Image(data, resources.affine if affine is None else affine), path)
    return path


def _brain_halves(resources, dtype=np.int16):
    data = np.zeros(resources.shape, dtype)
    data[: resources.shape[0] // 2] = 1
    data[resources.shape[0] // 2:] = 2
    return data


ATLASES = {
    "4d": (lambda r: np.stack([_brain_halves(r)] * 3, axis=-1), None, "4D"),
    "float-labels": (lambda r: _brain_halves(r, np.float32) * 1.5, None, "non-integer"),
    "outside-brain": (lambda r: _brain_halves(r), "shifted", "no region inside"),
    "one-region": (lambda r: np.ones(r.shape, np.int16), None, "needs at least 2"),
}


@pytest.mark.parametrize("case", sorted(ATLASES))
def test_unusable_atlas_is_65_before_preparation(case, bids, tmp_path, capsys, resources):
    make, where, words = ATLASES[case]
    affine = resources.affine.copy()
    if where == "shifted":
        affine[:3, 3] += 500.0
    atlas = _atlas(tmp_path, "atlas.nii.gz", make(resources), resources, affine)
    out = tmp_path / "out"
    code, err = run_cli([bids, out, "group", "--atlas-file", atlas] + TRAIN, capsys)
    assert code == 65 and words in error_line(err)
    assert cached(out) == []  # nothing was prepared


def test_atlas_file_name_with_separators_gets_a_label(bids, tmp_path, capsys, resources):
    atlas = _atlas(tmp_path, "my_atlas-v2.nii.gz", _brain_halves(resources), resources)
    out = tmp_path / "out"
    code, err = run_cli([bids, out, "group", "--atlas-file", atlas, "--masking", "random"]
                        + TRAIN, capsys)
    assert code == 0, err
    assert list(out.glob("*atlas-myatlasv2_res-2_dseg.nii.gz"))


# -- checkpoints -----------------------------------------------------------------------------

def _copy_output(pretrained, tmp_path) -> Path:
    out = tmp_path / "out"
    shutil.copytree(pretrained, out)
    return out


def test_truncated_model_is_rewritten_from_the_checkpoint(pretrained, tiny, tmp_path, capsys):
    out = _copy_output(pretrained, tmp_path)
    model = out / "models" / "m" / "model.pt"
    good = torch.load(model, weights_only=True)["model"]
    model.write_bytes(model.read_bytes()[:3000])
    code, err = run_cli([tiny, out, "group"] + TRAIN, capsys)
    assert code == 0, err
    assert "writing it again" in err
    again = torch.load(model, weights_only=True)["model"]
    assert all(torch.equal(good[k], again[k]) for k in good)


def test_truncated_checkpoint_says_how_to_start_over(pretrained, tiny, tmp_path, capsys):
    out = _copy_output(pretrained, tmp_path)
    ckpt = out / "models" / "m" / "checkpoint.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:3000])
    code, err = run_cli([tiny, out, "group"] + TRAIN, capsys)
    assert code == 65 and "--no-resume" in error_line(err)


def test_resume_on_other_prepared_runs_is_refused(pretrained, tiny, tmp_path, capsys):
    out = _copy_output(pretrained, tmp_path)
    before = (out / "models" / "m" / "checkpoint.pt").read_bytes()
    code, err = run_cli([tiny, out, "group", "--participant-label", "01", "02"] + TRAIN,
                        capsys)
    line = error_line(err)
    assert code == 64 and "other prepared runs" in line and "--no-resume" in line
    assert (out / "models" / "m" / "checkpoint.pt").read_bytes() == before
    code, err = run_cli([tiny, out, "group", "--participant-label", "01", "02",
                         "--no-resume"] + TRAIN, capsys)
    assert code == 0, err


def test_pretrained_option_given_a_finetuned_model_names_model(pretrained, bids, tmp_path,
                                                               capsys):
    ckpt = torch.load(pretrained / "models" / "m" / "model.pt", weights_only=True)
    ckpt["extra"]["kind"] = "finetune"
    fake = tmp_path / "ft" / "model.pt"
    fake.parent.mkdir()
    torch.save(ckpt, fake)
    (bids / "participants.tsv").write_text("participant_id\tdx\nsub-01\t0\nsub-02\t1\n"
                                           "sub-03\t0\n")
    out = _copy_output(pretrained, tmp_path)
    shutil.rmtree(out / "cache")
    code, err = run_cli([bids, out, "participant", "--mode", "finetune", "--target", "dx",
                         "--pretrained", fake] + FAST, capsys)
    line = error_line(err)
    assert code == 65 and "fine-tuned model: pass it with --model" in line, err
    assert "state_dict" not in err and cached(out) == []  # refused before preparing


def test_finetuned_models_record_the_pretrained_one_relative_to_models(tmp_path):
    from bids_roimae.training.finetune import recorded_pretrained

    models = tmp_path / "out" / "models"
    assert recorded_pretrained(models / "m" / "model.pt", models) == "m/model.pt"
    elsewhere = tmp_path / "elsewhere" / "model.pt"
    assert recorded_pretrained(elsewhere, models) == str(elsewhere)


# -- messages --------------------------------------------------------------------------------

def test_class_values_print_plainly():
    from bids_roimae.analysis.evaluation import make_folds
    from bids_roimae.errors import BadDataError

    with pytest.raises(BadDataError) as info:
        make_folds(np.array([0, 1, 1, 1, 1]), 2, 0, "binary")
    assert "class 0 has 1" in str(info.value) and "np." not in str(info.value)


def test_grid_difference_names_only_what_differs():
    from bids_roimae.io.bold import grid_difference

    a = np.diag([2.0, 2.0, 2.0, 1.0])
    b = a.copy()
    b[:3, 3] = [-90, -126, -72]
    text = grid_difference((97, 115, 97), a, (97, 115, 97), b)
    assert text.startswith("origin (0, 0, 0) mm vs (-90, -126, -72) mm")
    assert "shape" not in text and "voxel size" not in text


def test_help_describes_the_positional_arguments():
    out = subprocess.run(cli_cmd("--help"), capture_output=True, text=True, env=env(),
                         timeout=60)
    assert out.returncode == 0
    section = out.stdout.split("Positional arguments:")[1].split("Analysis:")[0]
    for name in ("BIDS_DIR", "OUTPUT_DIR", "ANALYSIS_LEVEL"):
        assert name in section


# -- stops, kills, concurrent runs -----------------------------------------------------------

def _lengthen(root, sub: str, times: int = 50) -> None:
    """Make a run long enough (tens of MB) that preparing it takes a while: a signal sent
    when the run before it is done then lands during its preparation."""
    img = nib.load(bold(root, sub))
    data = np.asanyarray(img.dataobj).astype(np.float32)
    save_like(bold(root, sub), np.concatenate([data] * times, axis=-1), img)
    confounds = func(root, sub) / f"sub-{sub}_task-rest_desc-confounds_timeseries.tsv"
    if confounds.exists():
        lines = confounds.read_text().splitlines()
        confounds.write_text("\n".join(lines[:1] + lines[1:] * times) + "\n")


def _start_and_signal(cmd, trigger: str, sig) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env())
    seen = []
    deadline = time.time() + 120
    for line in proc.stderr:
        seen.append(line)
        if trigger in line:
            proc.send_signal(sig)
            break
        assert time.time() < deadline, "".join(seen)
    rest = proc.communicate(timeout=120)[1]
    return proc, "".join(seen) + rest


def test_sigterm_in_prepare_stops_at_once_and_the_rerun_finishes(bids, tmp_path, capsys):
    out = tmp_path / "out"
    _lengthen(bids, "02")
    cmd = cli_cmd(bids, out, "participant", *FAST)
    proc, err = _start_and_signal(cmd, "sub-01_task-rest: prepared", signal.SIGTERM)
    assert proc.returncode == 143, err
    assert "Traceback" not in err and " ERROR " not in err  # not a failed run
    assert err.strip().splitlines()[-1] == "bids_roimae: stopped by signal SIGTERM"
    assert "sub-03" not in cached(out)
    first = {p: p.stat().st_mtime_ns for p in (out / "cache").rglob("*.npy")}
    code, err = run_cli(cmd[3:], capsys)  # the same command, in this process (faster)
    assert code == 0, err
    assert cached(out) == ["sub-01", "sub-02", "sub-03"]
    assert all(p.stat().st_mtime_ns == t for p, t in first.items())


def test_sigterm_in_pretrain_preparation_trains_on_nothing_then_rerun(bids, tmp_path,
                                                                      capsys):
    out = tmp_path / "out"
    _lengthen(bids, "02")
    cmd = cli_cmd(bids, out, "group", *TRAIN)
    proc, err = _start_and_signal(cmd, "sub-01_task-rest: prepared", signal.SIGTERM)
    assert proc.returncode == 143, err
    assert not (out / "models" / "m" / "checkpoint.pt").exists()  # no training on a part
    code, err = run_cli(cmd[3:], capsys)
    assert code == 0, err
    assert torch.load(out / "models" / "m" / "model.pt", weights_only=True)["scheduler"][
        "n_runs"] == 3


def test_sigkill_leftovers_are_removed_on_the_next_run(bids, tmp_path, capsys):
    out = tmp_path / "out"
    _lengthen(bids, "02")
    cmd = cli_cmd(bids, out, "participant", *FAST)
    proc, err = _start_and_signal(cmd, "sub-01_task-rest: prepared", signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL
    # what a writer killed mid-write leaves (fresh: removed because its process is gone)
    folder = out / "cache" / "sub-02"
    folder.mkdir(parents=True, exist_ok=True)
    leftover = folder / f".x.npy{atomic.TMP_MARK}{dead_pid()}-{atomic.host_tag()}-abcd1234"
    leftover.write_bytes(b"\0" * 1000)
    foreign = folder / f".y.npy{atomic.TMP_MARK}{dead_pid()}-ffffff-abcd1234"
    foreign.write_bytes(b"\0")  # another host's writer: may be alive, kept for a day
    code, err = run_cli([bids, out, "participant"] + FAST, capsys)
    assert code == 0, err
    assert cached(out) == ["sub-01", "sub-02", "sub-03"]
    assert not leftover.exists() and foreign.exists()


def test_concurrent_prepares_agree(bids, tmp_path, capsys):
    out = tmp_path / "out"
    other = subprocess.Popen(cli_cmd(bids, out, "participant", *FAST),
                             stderr=subprocess.PIPE, text=True, env=env())
    code, err = run_cli([bids, out, "participant"] + FAST, capsys)  # at the same time
    assert code == 0, err
    assert other.wait(timeout=300) == 0, other.communicate()[1]
    assert cached(out) == ["sub-01", "sub-02", "sub-03"]
    assert temporaries(out / "cache") == []


# -- full disks ------------------------------------------------------------------------------

@pytest.fixture
def small_disk(tmp_path):
    """Mount a tmpfs of a given size; skipped (reason printed) where mounting is refused."""
    mounts = []

    def mount(size_kb: int) -> Path:
        where = tmp_path / f"disk{len(mounts)}"
        where.mkdir()
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs",
                                 str(where)], capture_output=True, text=True)
        if result.returncode != 0:
            reason = f"cannot mount a tmpfs here: {result.stderr.strip() or 'not root'}"
            print(reason)
            pytest.skip(reason)
        mounts.append(where)
        return where

    if shutil.which("mount") is None:
        print("no mount command: disk-full cases skipped")
        pytest.skip("no mount command")
    yield mount
    for where in mounts:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def _used_kb(folder) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file()) // 1024


def test_full_disk_while_caching_is_73_naming_the_folder(bids, tmp_path, capsys, small_disk):
    probe = tmp_path / "probe"
    assert run_cli([bids, probe, "participant", "--participant-label", "01"] + FAST,
                   capsys)[0] == 0
    per_run = _used_kb(probe / "cache")
    disk = small_disk(per_run + per_run // 2 + 64)  # room for one run and a half
    out = disk / "out"
    code, err = run_cli([bids, out, "participant"] + FAST, capsys)
    assert code == 73, err
    line = [x for x in err.splitlines() if " ERROR " in x or "error:" in x]
    assert any("no space left" in x and "needs" in x and "cache" in x for x in line), err
    assert len(cached(out)) >= 1
    assert temporaries(out) == []  # partial files removed at once


def test_full_disk_while_saving_a_checkpoint_is_73(pretrained, tiny, tmp_path, capsys,
                                                   small_disk):
    need = _used_kb(pretrained) - _used_kb(pretrained / "models")
    disk = small_disk(need + 160)  # the cache and atlas fit, a checkpoint does not
    out = disk / "out"
    shutil.copytree(pretrained, out, ignore=shutil.ignore_patterns("models"))
    code, err = run_cli([tiny, out, "group"] + TRAIN, capsys)
    line = error_line(err)
    assert code == 73 and "checkpoint" in line and "needs" in line, err
    assert temporaries(out) == []


def test_full_disk_without_preallocation_is_still_73(tmp_path, small_disk, monkeypatch):
    """Where blocks cannot be reserved first, torch's own write error ("unexpected pos")
    is recognised as a full disk too, not a crash."""
    from bids_roimae.config import AppConfig
    from bids_roimae.core.geometry import build_geometry
    from bids_roimae.errors import OutputError
    from bids_roimae.io.checkpoint import ModelMeta, save_checkpoint

    monkeypatch.setattr(atomic, "preallocate", lambda path, size: None)
    disk = small_disk(100)
    mask = np.zeros((13, 17, 11), bool)
    mask[2:11, 3:14, 2:9] = True
    geometry = build_geometry(mask, np.eye(4), None, 3)
    big = torch.nn.Linear(400, 400)  # 640 kB of weights on a 100 kB disk
    with pytest.raises(OutputError) as info:
        save_checkpoint(disk / "m" / "checkpoint.pt", model=big, cfg=AppConfig(),
                        geometry=geometry, meta=ModelMeta())
    assert "no space left" in str(info.value) and "needs" in str(info.value)
    assert temporaries(disk) == []
