"""The Boutiques descriptor (CBRAIN) and the SLURM scripts agree with the CLI.

* ``bosh validate --bids`` accepts ``descriptor.json``;
* drift: every CLI option is in the descriptor and every descriptor flag is a CLI option,
  with the same choices, list-ness, numeric type, bounds and defaults;
* a command rendered from a descriptor invocation with every input set parses with the CLI;
* ``bosh exec launch --no-container`` runs participant-level preparation end to end;
* the SLURM array scripts pick the participant of their task and call the container.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import click
import pytest

from bids_roimae.cli import cli, expand_multi_values

REPO = Path(__file__).resolve().parents[1]
DESCRIPTOR = REPO / "descriptor.json"
SLURM = REPO / "scripts" / "slurm"

#: CLI parameters that the descriptor leaves out on purpose: --version prints and exits
#: (click adds --help itself, outside ``cli.params``).
IGNORED_PARAMS = {"version"}
POSITIONAL_KEYS = {"bids_dir": "[BIDS_DIR]", "output_dir": "[OUTPUT_DIR]",
                   "analysis_level": "[ANALYSIS_LEVEL]"}


def _descriptor() -> dict:
    return json.loads(DESCRIPTOR.read_text())


def _flagged_inputs(desc: dict) -> dict[str, dict]:
    return {inp["command-line-flag"]: inp for inp in desc["inputs"]
            if "command-line-flag" in inp}


def _cli_options() -> list[click.Option]:
    return [p for p in cli.params
            if isinstance(p, click.Option) and p.name not in IGNORED_PARAMS]


def _bosh(*args: str):
    from boutiques import bosh

    return bosh(list(args))


def test_bosh_validates_descriptor_as_bids_app(capsys):
    _bosh("validate", "--bids", str(DESCRIPTOR))
    assert "BIDS validation OK" in capsys.readouterr().out


def test_bosh_rejects_a_broken_bids_form(tmp_path):
    """The validation above can fail: the BIDS form needs the labels right after the level."""
    desc = _descriptor()
    desc["command-line"] = desc["command-line"].replace(
        "[PARTICIPANT_LABEL] [SESSION_LABEL] ", "") + " [PARTICIPANT_LABEL] [SESSION_LABEL]"
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps(desc))
    with pytest.raises(Exception, match="command-line doesn't match"):
        _bosh("validate", "--bids", str(broken))


def test_positionals_in_bids_app_order():
    cmd = _descriptor()["command-line"]
    args = [p.name for p in cli.params if isinstance(p, click.Argument)]
    assert args == list(POSITIONAL_KEYS)
    expected = "bids_roimae " + " ".join(POSITIONAL_KEYS.values())
    assert expected in cmd
    assert cmd.startswith("mkdir -p [OUTPUT_DIR]; ")


def test_every_cli_option_is_in_the_descriptor_and_back():
    flagged = _flagged_inputs(_descriptor())
    seen = set()
    for opt in _cli_options():
        names = set(opt.opts) | set(opt.secondary_opts)
        hits = names & set(flagged)
        assert len(hits) == 1, f"{opt.name}: descriptor has {sorted(hits)} of {names}"
        seen |= hits
    assert set(flagged) == seen, f"descriptor flags unknown to the CLI: {set(flagged) - seen}"


def test_value_keys_are_unique_and_all_in_command_line():
    desc = _descriptor()
    cmd = desc["command-line"]
    keys = [inp["value-key"] for inp in desc["inputs"]]
    # [OUTPUT_DIR] is shared by the new-folder name and the existing-folder input (BIDS form).
    assert keys.count("[OUTPUT_DIR]") == 2
    assert len(set(keys)) == len(keys) - 1
    for key in keys:
        assert key in cmd, key


def _default(opt: click.Option):
    """The option's default, None when unset (click marks that with a sentinel)."""
    value = opt.default
    return value if isinstance(value, (bool, int, float, str, tuple, list)) else None


def _expected_type(opt: click.Option) -> tuple[str, bool | None]:
    """(Boutiques type, integer?) for a click option."""
    if opt.is_flag or opt.count:
        return "Flag", None
    if isinstance(opt.type, (click.IntRange,)) or opt.type is click.INT:
        return "Number", True
    if isinstance(opt.type, click.FloatRange) or opt.type is click.FLOAT:
        return "Number", False
    if isinstance(opt.type, click.Path):
        return "File|String", None
    return "String", None


def test_types_choices_lists_bounds_and_defaults_match():
    flagged = _flagged_inputs(_descriptor())
    for opt in _cli_options():
        flag = (set(opt.opts) | set(opt.secondary_opts)) & set(flagged)
        inp = flagged[flag.pop()]
        where = f"{inp['id']} ({opt.name})"
        btype, integer = _expected_type(opt)
        assert inp["type"] in btype.split("|"), where
        if btype == "Flag":
            # A Flag must switch away from the default: --no-X for default-on options.
            flag_turns_on = inp["command-line-flag"] in opt.opts
            assert flag_turns_on == (not _default(opt)), where
            continue
        if integer is not None:
            assert bool(inp.get("integer", False)) == integer, where
        if isinstance(opt.type, click.Choice):
            assert inp["value-choices"] == list(opt.type.choices), where
        else:
            assert "value-choices" not in inp, where
        assert bool(inp.get("list", False)) == bool(opt.multiple), where
        if isinstance(opt.type, (click.IntRange, click.FloatRange)):
            assert inp.get("minimum") == opt.type.min, where
            assert inp.get("maximum") == opt.type.max, where
            assert bool(inp.get("exclusive-minimum", False)) == opt.type.min_open, where
            assert bool(inp.get("exclusive-maximum", False)) == opt.type.max_open, where
        # bosh adds default values to every command; one that the CLI leaves to the
        # config file (None) would silently override --config.
        if _default(opt) is None or opt.multiple:
            assert "default-value" not in inp, where
        elif "default-value" in inp:
            assert inp["default-value"] == _default(opt), where


def _full_invocation(desc: dict, tmp_path: Path) -> dict:
    """An invocation that sets every input, with values valid for their type."""
    inv = {}
    for inp in desc["inputs"]:
        if inp["id"] == "previous_output_dir":
            continue  # mutually exclusive with output_dir_name
        if "value-choices" in inp:
            value = inp["value-choices"][-1]
        elif inp["type"] == "Flag":
            value = True
        elif inp["type"] == "Number":
            low = inp.get("minimum", 0)
            value = int(low) + 2 if inp.get("integer") else 0.5
            if "maximum" in inp:
                value = min(value, inp["maximum"] / 2)
        elif inp["type"] == "File":
            value = str(tmp_path / inp["id"])
        else:
            value = f"val{inp['id'].replace('_', '')}"
        inv[inp["id"]] = [value, value + "2"] if inp.get("list") else value
    return inv


def test_rendered_command_parses_with_the_cli(tmp_path, capsys):
    desc = _descriptor()
    inv = _full_invocation(desc, tmp_path)
    inv_path = tmp_path / "invocation.json"
    inv_path.write_text(json.dumps(inv))
    _bosh("invocation", str(DESCRIPTOR), "-i", str(inv_path))
    capsys.readouterr()
    _bosh("exec", "simulate", str(DESCRIPTOR), "-i", str(inv_path))
    out = capsys.readouterr().out
    command = out.split("Generated Command:", 1)[1].strip().splitlines()[0]
    app_part = command.split("; ", 1)[1]
    argv = shlex.split(app_part)
    assert argv[0] == "bids_roimae"
    ctx = cli.make_context("bids_roimae", expand_multi_values(argv[1:]))
    params = ctx.params
    assert params["bids_dir"] == Path(inv["bids_dir"])
    assert params["analysis_level"] == inv["analysis_level"]
    assert list(params["participant_label"]) == inv["participant_label"]
    assert list(params["session_label"]) == inv["session_label"]
    assert list(params["positive"]) == inv["positive"]
    assert params["patch_size"] == inv["patch_size"]
    assert params["resume"] is False and params["fidelity"] is False
    assert params["mode"] == inv["mode"]


def test_example_invocation_is_valid(capsys):
    _bosh("invocation", str(DESCRIPTOR), "-i", str(REPO / "invocation.json"))
    _bosh("exec", "simulate", str(DESCRIPTOR), "-i", str(REPO / "invocation.json"))
    out = capsys.readouterr().out
    assert "--participant_label 01 02 --mode prepare" in out


def test_bosh_launch_prepares_participants(small_dataset, tmp_path, monkeypatch):
    """``bosh exec launch --no-container`` on a generated dataset, as CBRAIN would run it."""
    bids_dir = Path(small_dataset)
    monkeypatch.chdir(tmp_path)
    # bosh runs the command line through a shell: the app must be on its PATH.
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}"
                               f"{os.environ.get('PATH', '')}")
    labels = sorted(p.name[4:] for p in bids_dir.glob("sub-*") if p.is_dir())[:2]
    if not labels:  # an fMRIPrep-only dataset keeps subjects under derivatives
        labels = sorted(p.name[4:] for p in bids_dir.glob("derivatives/*/sub-*")
                        if p.is_dir())[:2]
    assert len(labels) == 2
    inv = {"bids_dir": str(bids_dir), "output_dir_name": "out",
           "analysis_level": "participant", "participant_label": labels,
           "mode": "prepare", "skip_bids_validation": True, "omp_nthreads": 1}
    (tmp_path / "inv.json").write_text(json.dumps(inv))
    result = _bosh("exec", "launch", "--no-container", "--skip-data-collection",
                   str(DESCRIPTOR), str(tmp_path / "inv.json"))
    assert result.exit_code == 0, result.stderr
    out = tmp_path / "out"
    assert [f.file_name for f in result.missing_files] == []
    desc = json.loads((out / "dataset_description.json").read_text())
    assert desc["DatasetType"] == "derivative"
    assert desc["GeneratedBy"][0]["Name"] == "bids_roimae"
    prepared = sorted(p.name for p in (out / "cache").glob("sub-*") if p.is_dir())
    assert prepared == [f"sub-{label}" for label in labels]
    for label in labels:
        metas = list((out / "cache" / f"sub-{label}").glob("*.json"))
        assert metas, label
        for meta in metas:
            assert json.loads(meta.read_text()).get("complete") is True
            assert meta.with_suffix(".npy").is_file()


# --- SLURM scripts --------------------------------------------------------------------

@pytest.mark.parametrize("script", sorted(SLURM.glob("*.sbatch")), ids=lambda p: p.name)
def test_sbatch_scripts_parse(script):
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "#SBATCH" in script.read_text()


def _shim(path: Path, log: Path) -> Path:
    """An executable that records its arguments, one per line, then a separator."""
    path.write_text(f'#!/bin/bash\nprintf "%s\\n" "$@" >> {shlex.quote(str(log))}\n'
                    f'echo ---- >> {shlex.quote(str(log))}\n')
    path.chmod(0o755)
    return path


def _run_array(script: str, task: int, tmp_path: Path, *extra: str):
    bids = tmp_path / "bids"
    bids.mkdir(exist_ok=True)
    # participant_id is not the first column on purpose; CRLF line ends as Excel writes.
    (bids / "participants.tsv").write_text(
        "age\tparticipant_id\tdx\r\n10\tsub-07\t1\r\n11\tsub-A2\t0\r\n12\tsub-13\t1\r\n")
    log = tmp_path / "calls.log"
    log.unlink(missing_ok=True)
    env = dict(os.environ, BIDS_DIR=str(bids), OUTPUT_DIR=str(tmp_path / "out"),
               SIF=str(tmp_path / "app.sif"), SLURM_ARRAY_TASK_ID=str(task),
               SLURM_ARRAY_JOB_ID="99", SLURM_CPUS_PER_TASK="3",
               WORK_ROOT=str(tmp_path / "scratch"),
               SINGULARITY=str(_shim(tmp_path / "singularity", log)))
    proc = subprocess.run(["bash", str(SLURM / script), *extra], env=env,
                          capture_output=True, text=True)
    calls = log.read_text().split("----\n")[:-1] if log.exists() else []
    return proc, [c.splitlines() for c in calls]


@pytest.mark.parametrize("script,mode", [("prepare_array.sbatch", "prepare"),
                                         ("predict_array.sbatch", "predict")])
def test_array_task_runs_its_participant(tmp_path, script, mode):
    proc, calls = _run_array(script, 2, tmp_path, "--space", "MNI152NLin2009cAsym")
    assert proc.returncode == 0, proc.stderr
    assert len(calls) == 1
    argv = calls[0]
    assert argv[:2] == ["exec", "--cleanenv"]
    i = argv.index("bids_roimae")
    assert argv[i - 1] == str(tmp_path / "app.sif")
    assert argv[i + 1:i + 4] == ["/data", "/out", "participant"]
    assert argv[argv.index("--mode") + 1] == mode
    assert argv[argv.index("--participant-label") + 1] == "A2"  # data line 2, no "sub-"
    assert argv[argv.index("--omp-nthreads") + 1] == "3"
    assert f"{tmp_path / 'bids'}:/data:ro" in argv
    assert argv[-2:] == ["--space", "MNI152NLin2009cAsym"]  # extra options pass through
    assert not (tmp_path / "scratch" / "roimae_99_2").exists()  # scratch cleaned up


def test_array_task_past_the_last_participant_does_nothing(tmp_path):
    proc, calls = _run_array("prepare_array.sbatch", 4, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert calls == []
    assert "nothing to do" in proc.stdout


def test_torchrun_script_meets_on_the_first_node(tmp_path):
    log = tmp_path / "calls.log"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _shim(bin_dir / "srun", log)
    (bin_dir / "scontrol").write_text("#!/bin/bash\nprintf 'gpu017\\ngpu018\\n'\n")
    (bin_dir / "scontrol").chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
               BIDS_DIR="/b", OUTPUT_DIR="/o", SIF="/x.sif", SINGULARITY="apptainer",
               SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="gpu[017-018]", SLURM_NNODES="2",
               SLURM_GPUS_ON_NODE="4", SLURM_CPUS_PER_TASK="32")
    proc = subprocess.run(["bash", str(SLURM / "pretrain_torchrun.sbatch"), "--steps", "9"],
                          env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    argv = log.read_text().split("----\n")[0].splitlines()
    t = argv.index("torchrun")
    run = argv[t:]
    assert run[run.index("--rdzv_endpoint") + 1] == "gpu017:29500"
    assert run[run.index("--rdzv_backend") + 1] == "c10d"
    assert run[run.index("--nnodes") + 1] == "2"
    assert run[run.index("--nproc_per_node") + 1] == "4"
    assert run[run.index("-m") + 1: run.index("-m") + 5] == [
        "bids_roimae.cli", "/data", "/out", "group"]
    assert run[run.index("--omp-nthreads") + 1] == "8"
    assert "--nv" in argv[:t] and run[-2:] == ["--steps", "9"]
    text = (SLURM / "pretrain_torchrun.sbatch").read_text()
    assert "#SBATCH --requeue" in text and "#SBATCH --signal=B:USR1@120" in text
