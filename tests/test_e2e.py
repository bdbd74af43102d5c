"""Every level and mode of the CLI on a generated dataset, in the order a user runs them."""

import json
import shutil

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from bids_roimae.cli import main

pytestmark = pytest.mark.slow

FAST = ["--patch-size", "3", "--skip-bids-validation", "--seed", "1"]


@pytest.fixture(scope="module")
def study(small_dataset, tmp_path_factory):
    """Run the whole pipeline once; the tests below inspect its outputs."""
    data = small_dataset.root
    out = tmp_path_factory.mktemp("e2e") / "out"
    codes = {}
    codes["prepare"] = main([str(data), str(out), "participant", "--mode", "prepare",
                             "--participant_label", "01", "02"] + FAST)
    for masking in ("roi", "random"):
        codes[f"pretrain_{masking}"] = main(
            [str(data), str(out), "group", "--masking", masking, "--steps", "8",
             "--batch-size", "2"] + FAST)
    codes["compare"] = main([str(data), str(out), "participant", "--mode", "finetune",
                             "--target", "DX ", "--positive", "1", "2", "3", "--folds", "3",
                             "--compare-masking"] + FAST)
    roi = out / "models" / "roimae_mask-roi_preset-tiny_ps-3" / "model.pt"
    codes["finetune"] = main([str(data), str(out), "participant", "--mode", "finetune",
                              "--target", "dx", "--positive", "1", "2", "3", "--folds", "3",
                              "--pretrained", str(roi)] + FAST)
    codes["predict"] = main([str(data), str(out), "participant", "--mode", "predict",
                             "--participant_label", "sub-01", "--ig-steps", "4"] + FAST)
    codes["embed"] = main([str(data), str(out), "participant", "--mode", "embed",
                           "--participant_label", "01", "02", "--pretrained", str(roi)] + FAST)
    codes["report"] = main([str(data), str(out), "group", "--mode", "report"] + FAST)
    return {"data": data, "out": out, "codes": codes, "manifest": small_dataset}


def test_every_step_succeeds(study):
    assert study["codes"] == {k: 0 for k in study["codes"]}


def test_prepare_then_group_reuse_the_cache(study):
    cached = sorted(p.name for p in (study["out"] / "cache").rglob("*.npy"))
    # participant prepared 01 and 02; group prepared the other four, once each
    assert len(cached) == 6
    assert sorted({n.split("_")[0] for n in cached}) == [f"sub-0{i}" for i in range(1, 7)]


def test_dataset_description_and_atlas(study):
    out = study["out"]
    desc = json.loads((out / "dataset_description.json").read_text())
    assert desc["DatasetType"] == "derivative"
    assert desc["GeneratedBy"][0]["Name"] == "bids_roimae"
    table = pd.read_csv(out / "atlas-AAL3_dseg.tsv", sep="\t")
    assert {"index", "name", "system"} <= set(table.columns)
    atlas = nib.load(out / "space-MNI152NLin2009cAsym_atlas-AAL3_res-2_dseg.nii.gz")
    assert atlas.shape == (13, 17, 11)


def test_models_side_by_side(study):
    models = study["out"] / "models"
    for masking in ("roi", "random"):
        folder = models / f"roimae_mask-{masking}_preset-tiny_ps-3"
        summary = json.loads((folder / "summary.json").read_text())
        assert summary["steps"] == 8
        assert (folder / "loss.png").stat().st_size > 0
        log = pd.read_csv(folder / "log.tsv", sep="\t")
        assert np.isfinite(log["loss"].dropna()).all()
    folder = models / "masking_comparison"
    comparison = pd.read_csv(folder / "masking_comparison.tsv", sep="\t")
    assert list(comparison.columns[3:7]) == ["estimate", "ci_low", "ci_high", "p"]
    # roi against random, and the built-in connectome baseline against both
    assert {"roi", "connectome"} == set(comparison["model"])
    assert "random" in set(comparison["reference"])
    assert {"roi-seed1", "random-seed1", "connectome"} == {
        p.stem.removeprefix("predictions_") for p in folder.glob("predictions_*.tsv")}
    spread = pd.read_csv(folder / "masking_spread.tsv", sep="\t")
    assert (spread["n_splits"] == 15).all()  # 5 repeats x 3 folds by default


def test_out_of_fold_predictions_for_every_labelled_subject(study):
    out = study["out"]
    for sub in range(1, 7):
        preds = pd.read_csv(out / f"sub-0{sub}" / "func" /
                            f"sub-0{sub}_desc-finetune_predictions.tsv", sep="\t")
        assert len(preds) >= 1
        assert set(preds["fold"]) <= {0, 1, 2}


def test_predict_outputs_on_the_source_grid(study):
    func = study["out"] / "sub-01" / "func"
    bold = nib.load(study["data"] / "derivatives" / "fmriprep" / "sub-01" / "func" /
                    "sub-01_task-rest_space-MNI152NLin2009cAsym_res-2_desc-preproc_bold.nii.gz")
    ig = nib.load(func / "sub-01_task-rest_space-MNI152NLin2009cAsym_res-2_stat-ig_"
                         "desc-absmean_boldmap.nii.gz")
    assert ig.shape == bold.shape[:3]
    np.testing.assert_allclose(ig.affine, bold.affine)
    assert np.asarray(ig.dataobj).max() > 0
    pred = pd.read_csv(func / "sub-01_desc-predict_predictions.tsv", sep="\t")
    assert pred.loc[0, "predicted_label"] in ("positive", "negative") or \
        str(pred.loc[0, "predicted_label"]) in {"0", "1"}
    assert 0.0 <= float(pred.loc[0, "probability"]) <= 1.0
    assert (func / "sub-01_desc-predict_embedding.tsv").exists()
    assert (study["out"] / "sub-01.html").stat().st_size > 1000
    assert not (study["out"] / "sub-02.html").exists()  # predict ran for sub-01 only
    # sub-01 was in the cross-validation: its map comes from the fold that tested it.
    table = next(func.glob("sub-01_*_stat-ig_bold.tsv"))
    sidecar = json.loads(table.with_suffix(".json").read_text())
    source = sidecar["Model"]["AttributionModel"]
    assert source["TrainedOnThisParticipant"] is False
    assert source["Source"].startswith("cross-validation fold")
    assert sidecar["ClassifierOutOfFold"].startswith("out-of-fold accuracy")
    assert {"scaled_mean_abs", "random_mean_abs"} <= set(pd.read_csv(table, sep="\t"))


def test_embed_writes_frozen_encoder_features_that_read_back(study):
    import hashlib

    roi = study["out"] / "models" / "roimae_mask-roi_preset-tiny_ps-3" / "model.pt"
    for sub in ("01", "02"):
        func = study["out"] / f"sub-{sub}" / "func"
        stem = func / f"sub-{sub}_atlas-AAL3_desc-region_embedding"
        region = pd.read_csv(f"{stem}.tsv", sep="\t")
        matrix = np.load(f"{stem}.npy")
        assert list(region.columns[:2]) == ["index", "name"]
        assert matrix.shape == (len(region), region.shape[1] - 2)
        np.testing.assert_allclose(region.iloc[:, 2:].to_numpy(), matrix, rtol=1e-4,
                                   atol=1e-6)
        assert region["name"].str.len().min() > 0 and region["index"].is_monotonic_increasing
        meta = json.loads(open(f"{stem}.json").read())
        assert meta["ModelSHA256"] == hashlib.sha256(roi.read_bytes()).hexdigest()
        assert meta["NumberOfWindows"] >= 1 and meta["Readout"] == "region"
        corr = np.load(func / f"sub-{sub}_atlas-AAL3_desc-regioncorr_embedding.npy")
        assert corr.shape == (len(region), len(region))
        np.testing.assert_allclose(np.diag(corr), 1.0)
        np.testing.assert_allclose(corr, corr.T)
        sd = pd.read_csv(func / f"sub-{sub}_atlas-AAL3_desc-regionsd_embedding.tsv", sep="\t")
        assert sd.shape == region.shape and (sd.iloc[:, 2:].to_numpy() >= 0).all()
        assert sd.iloc[:, 2:].to_numpy().max() > 0  # pooled tokens vary over time
        np.testing.assert_allclose(
            np.load(func / f"sub-{sub}_atlas-AAL3_desc-regionsd_embedding.npy"),
            sd.iloc[:, 2:].to_numpy(), rtol=1e-4, atol=1e-6)
        mean = pd.read_csv(func / f"sub-{sub}_atlas-AAL3_desc-mean_embedding.tsv", sep="\t")
        assert mean.shape == (1, matrix.shape[1])
    assert not list((study["out"] / "sub-03" / "func").glob("*_desc-region_embedding.tsv"))


def test_group_report(study):
    html = study["out"] / "group" / "group_report.html"
    text = html.read_text()
    assert "<img" in text and "http://" not in text.replace("http://www.w3.org", "")
    ranking = pd.read_csv(study["out"] / "group" / "seg-AAL3_stat-ig_desc-regions_stats.tsv",
                          sep="\t")
    assert ranking["rank"].iloc[0] == 1 and ranking["mean"].is_monotonic_decreasing
    assert "Comparison" in text or "comparison" in text  # the masking comparison is shown


def test_report_covariates(study):
    base = [str(study["data"]), str(study["out"]), "group", "--mode", "report"] + FAST
    assert main(base + ["--covariates", "nosuchcolumn"]) == 64
    assert main(base + ["--covariates", "AGE", "sex", "meanfd"]) == 0


def test_outputs_pass_the_bids_validator(study):
    import subprocess
    import sys
    from pathlib import Path

    exe = shutil.which("bids-validator-deno", path=str(Path(sys.executable).parent)) or \
        shutil.which("bids-validator-deno")
    assert exe, "bids-validator-deno is a dependency"

    proc = subprocess.run([exe, str(study["out"]), "--ignoreWarnings"], capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
