"""End to end on a planted effect: the foundation model's probe and the connectome baseline.

One small configuration of ``benchmarks/science.py``: 20 generated subjects on the small
grid (ADHD-like larger fluctuation and weaker network coupling in two regions), short
ROI-masked pretraining, then fine-tuning with the default readout. The frozen encoder's
region readout must be clearly above chance, and the connectome baseline must sit beside
it on the same folds in metrics.json (on this grid and 40 frames the baseline itself is
near chance: 2 planted of 29 regions, 406 connections for 15 training subjects).
"""

import json

import pandas as pd
import pytest

from bids_roimae.cli import main

pytestmark = pytest.mark.slow

OPTS = ["--patch-size", "2", "--window", "8", "--temporal-patch", "2",
        "--skip-bids-validation", "--seed", "1", "--device", "cpu"]


@pytest.fixture(scope="module")
def finetuned(resources, tmp_path_factory):
    from bids_roimae.synth.dataset import make_dataset

    base = tmp_path_factory.mktemp("science")
    data, out = base / "bids", base / "out"
    make_dataset(data, n_subjects=20, n_frames=40, seed=3, effect_size=0.6)
    assert main([str(data), str(out), "group", "--steps", "30", "--batch-size", "8"]
                + OPTS) == 0
    assert main([str(data), str(out), "participant", "--mode", "finetune", "--target", "dx",
                 "--positive", "1", "2", "3", "--folds", "4"] + OPTS) == 0
    model_dir = next((out / "models").glob("*_ft-dx_linear-probe"))
    return out, model_dir, json.loads((model_dir / "metrics.json").read_text())


def test_region_readout_probe_is_clearly_above_chance(finetuned):
    _, _, summary = finetuned
    assert summary["readout"] == "region-sd"
    # measured: accuracy 0.65-0.8, AUC 0.83 (4 folds of 5 subjects: one subject = 0.2)
    assert summary["metrics"]["roc_auc"]["mean"] >= 0.75, summary["metrics"]
    assert summary["metrics"]["accuracy"]["mean"] >= 0.6, summary["metrics"]


def test_baseline_beside_the_model_on_the_same_folds(finetuned):
    _, model_dir, summary = finetuned
    base = summary["baseline"]
    assert base["name"] == "connectome" and base["connectivity"] == "correlation"
    # (on this tiny grid, 40 frames, the connectome is weak: its level is not the claim)
    assert 0.0 <= base["metrics"]["accuracy"]["mean"] <= 1.0
    model = pd.read_csv(model_dir / "predictions.tsv", sep="\t").set_index("participant_id")
    baseline = pd.read_csv(model_dir / "baseline_predictions.tsv", sep="\t").set_index(
        "participant_id")
    assert model["fold"].equals(baseline.loc[model.index, "fold"])


def test_pretraining_learned_more_than_a_trivial_predictor(finetuned):
    out, _, _ = finetuned
    summary = json.loads(next((out / "models").glob("roimae_mask-roi_*/summary.json"))
                         .read_text())
    # step 0 is the zero predictor (skill 0); 30 steps on this grid measured 0.001: above
    # zero, not yet "clearly" (see README)
    assert summary["initial_val_skill"]["val_skill_zero"] == pytest.approx(0.0, abs=1e-6)
    assert summary["final_val_skill"]["val_skill_zero"] > 0.0
    log = pd.read_csv(next((out / "models").glob("roimae_mask-roi_*/log.tsv")), sep="\t")
    assert log["val_skill_zero"].iloc[-1] > log["val_skill_zero"].iloc[0]
