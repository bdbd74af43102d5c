"""Command-line conventions: exit codes, list options, help, refusals."""

import os

import pytest
import torch

from bids_roimae import __version__
from bids_roimae.cli import analysis_level_argument, expand_multi_values, main


def test_version(capsys):
    assert main(["--version"]) == 0
    assert __version__ in capsys.readouterr().out


def test_help_groups_options(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for section in ("BIDS selection", "Template and atlas", "Pretraining",
                    "Fine-tuning and prediction", "Resources and run control"):
        assert section in out
    assert out.index("--participant-label") < out.index("--model-preset")


def test_unknown_level_is_17(tmp_path, capsys):
    assert main([str(tmp_path), str(tmp_path / "out"), "subject"]) == 17
    assert "unknown analysis level 'subject'" in capsys.readouterr().err


@pytest.mark.parametrize("args", [
    ["participant", "--mode", "pretrain"],          # mode of the other level
    ["group", "--mode", "predict"],
    ["participant", "--masking", "nonsense"],       # bad choice
    ["participant", "--steps", "0"],                # out of range
    ["participant", "--no-such-option"],
    ["participant", "--mode", "finetune"],          # needs --target
    ["participant", "--atlas-labels", "x.tsv"],     # needs --atlas-file
])
def test_usage_errors_are_64(tmp_path, capsys, args):
    (tmp_path / "in").mkdir()
    code = main([str(tmp_path / "in"), str(tmp_path / "out")] + args)
    err = capsys.readouterr().err
    assert code == 64, err
    assert "Traceback" not in err and err.startswith("bids_roimae: error:")


def test_output_equal_to_input_is_refused(tmp_path, capsys):
    assert main([str(tmp_path), str(tmp_path), "participant"]) == 64
    assert "must differ" in capsys.readouterr().err


def test_missing_bids_dir_is_66(tmp_path, capsys):
    assert main([str(tmp_path / "nope"), str(tmp_path / "out"), "participant"]) == 66


def test_bad_config_file_is_64(tmp_path, capsys):
    (tmp_path / "in").mkdir()
    cfg = tmp_path / "c.toml"
    cfg.write_text("[train]\nsteeps = 1\n")
    assert main([str(tmp_path / "in"), str(tmp_path / "out"), "participant",
                 "--config", str(cfg)]) == 64
    assert "steeps" in capsys.readouterr().err


def test_list_options_take_several_values():
    argv = ["/d", "/o", "participant", "--participant_label", "01", "sub-02", "03",
            "--task-label=rest", "--positive", "1", "2", "-v"]
    assert expand_multi_values(argv) == [
        "/d", "/o", "participant", "--participant_label", "01", "--participant_label",
        "sub-02", "--participant_label", "03", "--task-label", "rest", "--positive", "1",
        "--positive", "2", "-v"]
    # values stop at a path, so positionals after the list survive
    assert expand_multi_values(["--participant-label", "01", "/data", "/out", "group"]) == [
        "--participant-label", "01", "/data", "/out", "group"]


def test_level_found_past_option_values():
    assert analysis_level_argument(["--atlas", "AAL3", "/d", "/o", "group", "-v"]) == "group"
    assert analysis_level_argument(["/d", "/o"]) is None


def test_training_gets_every_core_and_preparation_workers_share_them(monkeypatch):
    from bids_roimae.app.context import set_threads

    cores = len(os.sched_getaffinity(0))
    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
        set_threads(None, 2)  # --nprocs 2: two workers prepare, then one process trains
        assert torch.get_num_threads() == cores
        assert os.environ["OMP_NUM_THREADS"] == str(max(1, cores // 2))
        # The container image sets OMP_NUM_THREADS=1 (BLAS at import); --omp-nthreads,
        # not that, sets the threads.
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        set_threads(None, 1)
        assert torch.get_num_threads() == cores and os.environ["OMP_NUM_THREADS"] == str(cores)
        set_threads(3, 4)  # --omp-nthreads wins
        assert torch.get_num_threads() == 3 and os.environ["OMP_NUM_THREADS"] == "3"
    finally:
        torch.set_num_threads(before)
