"""Pretraining loop: learning, checkpoints, exact resume, non-finite stop, DDP."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from ddp_worker import FakeEntry, make_entries, make_geometry, tiny_config

from bids_roimae.config import AppConfig, ConfigError
from bids_roimae.errors import AppError, BadDataError, UsageError
from bids_roimae.io.checkpoint import AtlasMeta, load_checkpoint, load_model
from bids_roimae.model.mae import build_model
from bids_roimae.training.pretrain import lr_at, model_name, run_pretraining
from bids_roimae.training.sampling import split_subjects, step_plan, window_index
from bids_roimae.training.schedule import peak_lr

torch.set_num_threads(1)
HERE = Path(__file__).resolve().parent
ATLAS = AtlasMeta(name="synthetic", hash="abc", index=(1, 2), names=("a", "b"))


@pytest.fixture(scope="module")
def geometry():
    return make_geometry(patch_size=3)


@pytest.fixture(scope="module")
def entries(geometry):
    return make_entries(geometry)


def _weights(path):
    return load_checkpoint(path)["model"]


def test_loss_falls_and_outputs_are_written(geometry, entries, tmp_path):
    cfg = tiny_config(steps=60, log_every=20, checkpoint_every=60, val_batches=2)
    final = run_pretraining(entries, geometry, cfg, tmp_path / "m", device="cpu",
                            atlas=ATLAS)
    assert final == tmp_path / "m" / "model.pt" and final.is_file()
    log = pd.read_csv(tmp_path / "m" / "log.tsv", sep="\t")
    assert list(log.columns) == ["step", "loss", "val_loss", "lr", "tokens_per_s",
                                 "samples_per_s", "val_skill_zero", "val_skill_visible"]
    assert log["step"].tolist() == [0, 20, 40, 60]
    summary = json.loads((tmp_path / "m" / "summary.json").read_text())
    assert summary["steps"] == 60 and summary["n_subjects"] == 4
    assert len(summary["val_subjects"]) == 1
    assert summary["final_val_loss"] < summary["initial_val_loss"]
    # The output layer starts at zero: step 0 *is* the zero predictor (skill 0), so any
    # skill above 0 was learned, not the unlearning of a random initialisation.
    assert summary["initial_val_skill"]["val_skill_zero"] == pytest.approx(0.0, abs=1e-6)
    skill = summary["final_val_skill"]
    # 60 steps on 4 tiny subjects: small but above predicting zero (0.01-0.03 measured)
    assert skill["val_skill_zero"] > 0.0
    assert log["val_skill_zero"].iloc[-1] == pytest.approx(skill["val_skill_zero"], rel=1e-4)
    assert np.isfinite(log["val_skill_visible"]).all()
    assert log["val_loss"].iloc[-1] == pytest.approx(summary["final_val_loss"], rel=1e-4)
    assert summary["masking"]["strategy"] == "roi"
    assert summary["geometry"]["n_tokens"] == geometry.n_tokens
    assert (tmp_path / "m" / "loss.png").stat().st_size > 1000
    ckpt = load_checkpoint(final)
    assert ckpt["extra"]["kind"] == "pretrain" and ckpt["extra"]["names"] == ["a", "b"]
    assert ckpt["step"] == 60 and set(ckpt["versions"]) >= {"bids_roimae", "torch", "numpy",
                                                            "python"}


def test_checkpoint_round_trip(geometry, entries, tmp_path):
    live = {}
    cfg = tiny_config(steps=3)
    final = run_pretraining(entries, geometry, cfg, tmp_path / "m", device="cpu",
                            step_callback=lambda step, model: live.update(model.state_dict()))
    torch.load(final, weights_only=True)  # loadable without unpickling code
    loaded = load_model(final)
    model, cfg2, geom2 = loaded.model, loaded.cfg, loaded.geometry
    assert cfg2.to_dict() == cfg.to_dict()
    assert np.array_equal(geom2.voxel_mask, geometry.voxel_mask)
    assert np.array_equal(geom2.centres_mm, geometry.centres_mm)
    reference = build_model(cfg, geometry).eval()
    reference.load_state_dict(live)
    x = torch.as_tensor(np.stack([entries[0].tokens()[:8]]).astype(np.float32))
    mask = torch.zeros(1, 4, geometry.n_tokens, dtype=torch.bool)
    mask[:, :, ::3] = True
    with torch.no_grad():
        assert torch.equal(model(x, mask)[1], reference(x, mask)[1])
        assert torch.equal(model.embed(x), reference.embed(x))
    fresh = build_model(cfg, geometry).eval()
    with torch.no_grad():
        assert not torch.equal(fresh.embed(x), model.embed(x))


class _Kill(Exception):
    pass


def test_resume_equals_uninterrupted(geometry, entries, tmp_path):
    cfg = tiny_config(steps=6, checkpoint_every=3, log_every=1)
    straight = run_pretraining(entries, geometry, cfg, tmp_path / "a", device="cpu")

    def kill(step, model):
        if step == 4:
            raise _Kill()

    with pytest.raises(_Kill):
        run_pretraining(entries, geometry, cfg, tmp_path / "b", device="cpu",
                        step_callback=kill)
    assert load_checkpoint(tmp_path / "b" / "checkpoint.pt")["step"] == 3
    assert not (tmp_path / "b" / "model.pt").exists()
    resumed = run_pretraining(entries, geometry, cfg, tmp_path / "b", device="cpu")
    a, b = _weights(straight), _weights(resumed)
    assert set(a) == set(b)
    assert all(torch.equal(a[k], b[k]) for k in a)
    log_a = pd.read_csv(tmp_path / "a" / "log.tsv", sep="\t")
    log_b = pd.read_csv(tmp_path / "b" / "log.tsv", sep="\t")
    assert log_b["step"].tolist() == list(range(7))
    assert np.allclose(log_a["loss"].iloc[1:], log_b["loss"].iloc[1:])
    # an uninterrupted run differs from one with another seed (the check has teeth)
    cfg.seed = 1
    other = run_pretraining(entries, geometry, cfg, tmp_path / "c", device="cpu")
    assert not all(torch.equal(a[k], _weights(other)[k]) for k in a)


def test_resume_refuses_other_settings(geometry, entries, tmp_path):
    cfg = tiny_config(steps=3)
    run_pretraining(entries, geometry, cfg, tmp_path / "m", device="cpu")
    before = (tmp_path / "m" / "checkpoint.pt").read_bytes()
    cfg.masking.ratio = 0.7
    with pytest.raises(UsageError, match="masking.ratio"):
        run_pretraining(entries, geometry, cfg, tmp_path / "m", device="cpu")
    assert (tmp_path / "m" / "checkpoint.pt").read_bytes() == before
    # settings that do not change the weights may differ; a finished run is reused
    cfg.masking.ratio = 0.5
    cfg.train.log_every = 1
    mtime = (tmp_path / "m" / "model.pt").stat().st_mtime_ns
    run_pretraining(entries, geometry, cfg, tmp_path / "m", device="cpu")
    assert (tmp_path / "m" / "model.pt").stat().st_mtime_ns == mtime


def test_non_finite_loss_stops_and_keeps_checkpoint(geometry, tmp_path):
    entries = make_entries(geometry, n_subjects=2)
    cfg = tiny_config(steps=8, checkpoint_every=3, val_fraction=0.0)
    saved = {}

    def poison(step, model):
        if step == 4:
            saved["bytes"] = (tmp_path / "m" / "checkpoint.pt").read_bytes()
            for e in entries:
                e.tokens()[:] = np.inf

    with pytest.raises(AppError, match="not finite") as info:
        run_pretraining(entries, geometry, cfg, tmp_path / "m", device="cpu",
                        step_callback=poison)
    assert info.value.exit_code == 1 and type(info.value) is AppError
    assert "checkpoint" in str(info.value)
    assert (tmp_path / "m" / "checkpoint.pt").read_bytes() == saved["bytes"]
    assert load_checkpoint(tmp_path / "m" / "checkpoint.pt")["step"] == 3
    assert not (tmp_path / "m" / "model.pt").exists()


def test_runs_shorter_than_a_window_are_refused(geometry, tmp_path):
    short = [FakeEntry(np.zeros((5, geometry.n_tokens, geometry.patch_voxels)), "01", "1")]
    with pytest.raises(BadDataError, match="frames"):
        run_pretraining(short, geometry, tiny_config(), tmp_path / "m", device="cpu")


def test_model_names_differ_by_masking():
    cfg = tiny_config()
    roi = model_name(cfg)
    cfg.masking.strategy = "random"
    assert roi == "roimae_mask-roi_preset-tiny_ps-3"
    assert model_name(cfg) == "roimae_mask-random_preset-tiny_ps-3" != roi


def test_subject_split_and_step_plan(geometry):
    entries = make_entries(geometry, n_subjects=5, runs=2, n_frames=12)
    train, val, val_subjects = split_subjects(entries, 0.2, seed=0)
    assert len(val_subjects) == 1 and len(val) == 2 and len(train) == 8
    assert not {e.subject for e in train} & set(val_subjects)
    two = [e for e in entries if e.subject in ("00", "01")]
    assert split_subjects(two, 0.1, 0)[2] in (["00"], ["01"])  # one held out, one kept
    assert split_subjects(entries[:2], 0.5, 0)[2] == []  # a single subject is never held out
    assert split_subjects(entries, 0.0, 0)[2] == []
    index = window_index(train, 8)
    assert len(index) == 8 * 5 and index.n_epoch_windows == 8
    cfg = tiny_config()
    one = step_plan(index, 5, 0, 4, 0, 1, cfg.masking, geometry, 4)
    again = step_plan(index, 5, 0, 4, 0, 1, cfg.masking, geometry, 4)
    assert all(np.array_equal(a, b) for a, b in zip(one, again))
    whole = step_plan(index, 5, 0, 4, 0, 1, cfg.masking, geometry, 4)
    r0 = step_plan(index, 5, 0, 2, 0, 2, cfg.masking, geometry, 4)
    r1 = step_plan(index, 5, 0, 2, 1, 2, cfg.masking, geometry, 4)
    assert np.array_equal(np.concatenate([r0[0], r1[0]]), whole[0])
    assert not np.array_equal(r0[2], r1[2])


def test_learning_rate_schedule():
    cfg = tiny_config().train
    cfg.warmup_steps, cfg.lr, cfg.min_lr = 5, 1e-3, 1e-5
    rates = [lr_at(s, 50, cfg) for s in range(50)]
    assert rates[0] < rates[4] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(rates[5:], rates[6:]))
    assert rates[-1] == pytest.approx(1e-5, abs=2e-6)


def test_peak_learning_rate_follows_the_preset_unless_set(geometry, entries, tmp_path):
    cfg = AppConfig()
    assert cfg.train.lr is None and cfg.model.preset == "tiny"
    assert peak_lr(cfg) == 1e-3
    cfg.model.preset = "base"
    assert peak_lr(cfg) == 1.5e-4
    cfg.train.lr = 3e-4
    assert peak_lr(cfg) == 3e-4
    cfg.train.lr = 0.0
    with pytest.raises(ConfigError, match="train.lr must be > 0"):
        cfg.validate()
    # unset, a pretraining run uses (and records) the preset's peak
    run_cfg = tiny_config(steps=4, warmup_steps=2, lr=None)
    run_pretraining(entries, geometry, run_cfg, tmp_path / "m", device="cpu", atlas=ATLAS)
    summary = json.loads((tmp_path / "m" / "summary.json").read_text())
    assert summary["peak_lr"] == 1e-3
    log = pd.read_csv(tmp_path / "m" / "log.tsv", sep="\t")
    assert log["lr"].max() == pytest.approx(1e-3, rel=1e-3)


def test_ddp_two_cpu_processes(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(HERE) + os.pathsep +
               os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(HERE / "ddp_worker.py"), str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world"] == 2 for r in reports)
    assert reports[0]["live_digest"] == reports[1]["live_digest"]
    assert reports[0]["file_digest"] == reports[0]["live_digest"]
    files = sorted(p.name for p in (tmp_path / "model").iterdir())
    assert files.count("checkpoint.pt") == 1 and "model.pt" in files
    assert not [f for f in files if ".tmp" in f]
    summary = json.loads((tmp_path / "model" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["windows_seen"] == 4 * 2 * 4


def test_trivial_predictors_of_the_skill():
    from bids_roimae.training.recon_skill import SkillSums, visible_mean_prediction

    # one sample, one time step, 4 tokens of 2 voxels: regions 0, 0, 1, 1
    target = torch.tensor([[[[1.0, 3.0], [5.0, 7.0], [2.0, 2.0], [9.0, 9.0]]]])
    hidden = torch.tensor([[[False, True, True, True]]])
    fm = torch.ones(4, 2, dtype=torch.bool)
    pred = visible_mean_prediction(target, hidden, fm, torch.tensor([0, 0, 1, 1]))
    # token 1: the visible token of its region; tokens 2-3: their region is all hidden,
    # so the mean of every visible token at that time step
    assert pred[0, 0].tolist() == [[1.0, 3.0], [1.0, 3.0], [1.0, 3.0], [1.0, 3.0]]
    sums = SkillSums(model=1.0, zero=4.0, visible=2.0)
    assert sums.skill_zero == pytest.approx(0.75) and sums.skill_visible == pytest.approx(0.5)


@pytest.mark.parametrize("attention,count", [("divided", "exact"), ("joint", "whole")])
def test_validation_scores_at_hidden_tokens_match_the_full_reconstruction(attention, count):
    """Validation decodes the hidden tokens only; its loss and skill sums are those of the
    full reconstruction scored at the hidden voxels."""
    from bids_roimae.core.masking import make_batch_masks
    from bids_roimae.training.recon_skill import (
        skill_sums,
        token_regions,
        visible_mean_prediction,
    )

    geometry = make_geometry()
    cfg = tiny_config()
    cfg.model.attention = attention
    torch.manual_seed(0)
    model = build_model(cfg, geometry).eval()
    x = torch.randn(3, 8, geometry.n_tokens, geometry.patch_voxels)
    x = x * torch.as_tensor(geometry.voxel_mask)
    mask = torch.as_tensor(make_batch_masks("roi", geometry, 0.5, 3, 4,
                                            np.random.default_rng(2), count=count))
    regions = token_regions(geometry.patch_label)
    with torch.no_grad():
        full_loss, pred = model(x, mask)
        hidden = model.hidden_tokens(x, mask)
        got = skill_sums(hidden, mask, model.feature_mask, regions)
        target = model.targets(model.group_time(x))
        weight = (mask[..., None] & model.feature_mask).float()
        baseline = visible_mean_prediction(target, mask, model.feature_mask, regions)
    assert float(hidden.loss()) == pytest.approx(float(full_loss), rel=1e-5)
    assert got.model == pytest.approx(float(((pred - target) ** 2 * weight).sum()), rel=1e-5)
    assert got.zero == pytest.approx(float((target ** 2 * weight).sum()), rel=1e-5)
    assert got.visible == pytest.approx(float(((baseline - target) ** 2 * weight).sum()),
                                        rel=1e-5)
    assert 0 < got.visible and got.model != got.zero
