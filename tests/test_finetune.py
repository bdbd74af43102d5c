"""Fine-tuning, cross-validation outputs, the saved model and prediction, end to end.

Data: a 13x17x11 grid cut into 3^3-voxel patches, runs written into a real token cache;
"positive" subjects carry a planted offset in one atlas region. The pretrained model is a
tiny, untrained RoiMAE saved as a real checkpoint (its random features still carry the
planted offset, which is all a linear probe needs).
"""

import json

import numpy as np
import pandas as pd
import pytest
import torch

from bids_roimae.analysis.evaluation import make_folds
from bids_roimae.analysis.labels import parse_labels
from bids_roimae.config import AppConfig
from bids_roimae.core.geometry import build_geometry
from bids_roimae.errors import BadDataError, UsageError
from bids_roimae.io.cache import write_entry
from bids_roimae.io.checkpoint import (
    AtlasMeta,
    ModelMeta,
    load_checkpoint,
    load_model,
    save_checkpoint,
)
from bids_roimae.model.mae import build_model
from bids_roimae.training.classifier_fit import fit_linear_probe, probe_classifier
from bids_roimae.training.comparison import compare_masking
from bids_roimae.training.cross_validation import cross_validate, frozen_embeddings
from bids_roimae.training.finetune import predict_subject, run_finetune
from bids_roimae.training.windows import embed_windows, load_windows, subject_windows, window_starts

torch.set_num_threads(1)
N_SUBJECTS = 24
OFFSET = 1.0


def make_geometry(patch_size=3):
    shape = (13, 17, 11)
    ijk = np.indices(shape).transpose(1, 2, 3, 0)
    centre = (np.array(shape) - 1) / 2
    mask = (((ijk - centre) / (centre * 0.9)) ** 2).sum(-1) <= 1
    labels = np.where(mask, 1 + (ijk[..., 0] > 6) + 2 * (ijk[..., 2] > 5), 0)
    return build_geometry(mask, np.diag([2.0, 2.0, 2.0, 1.0]), labels, patch_size)


def make_cfg(strategy="linear-probe", folds=3):
    cfg = AppConfig()
    cfg.geometry.patch_size, cfg.geometry.window, cfg.geometry.temporal_patch = 3, 8, 4
    cfg.model.embed_dim, cfg.model.depth, cfg.model.num_heads = 32, 1, 2
    cfg.model.decoder_dim, cfg.model.decoder_depth, cfg.model.decoder_heads = 16, 1, 2
    cfg.finetune.strategy, cfg.finetune.folds = strategy, folds
    cfg.finetune.windows_per_run, cfg.finetune.epochs, cfg.finetune.batch_size = 2, 3, 8
    # The planted difference here is a constant offset, which the time-averaged region
    # readout carries and the default region-sd (fluctuation) readout by design does not.
    cfg.finetune.readout = "region"
    return cfg


def save_pretrained(path, geometry, seed, masking="roi", **settings):
    cfg = make_cfg()
    cfg.masking.strategy, cfg.seed = masking, seed
    for key, value in settings.items():  # e.g. model__preset="small"
        section, name = key.split("__")
        setattr(getattr(cfg, section), name, value)
    torch.manual_seed(seed)
    save_checkpoint(path, model=build_model(cfg, geometry), cfg=cfg, geometry=geometry,
                    meta=ModelMeta(kind="pretrain", atlas=AtlasMeta(name="toy")))
    return path


def write_run(root, geometry, subject, run, amount, rng, n_frames=20, session=None):
    tokens = rng.normal(size=(n_frames, geometry.n_tokens, geometry.patch_voxels))
    tokens[:, geometry.patch_label == 1, :] += amount  # the planted group difference
    tokens = (tokens * geometry.voxel_mask).astype(np.float32)
    ses = f"_ses-{session}" if session else ""
    key = f"sub-{subject}{ses}_task-rest_run-{run}"

    def fill(array):
        array[...] = tokens

    return write_entry(root / "cache" / f"sub-{subject}" / f"{key}_abc.npy", tokens.shape,
                       np.float16, fill, {"subject": subject, "session": session,
                                          "run_key": key})


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """Output folder with a pretrained model, cached runs and a participants table."""
    root = tmp_path_factory.mktemp("study")
    geometry = make_geometry()
    rng = np.random.default_rng(0)
    entries, rows = [], []
    for i in range(N_SUBJECTS):
        subject, dx = f"{i:02d}", "1" if i % 2 else "0"
        amount = OFFSET * (dx == "1")
        entries.append(write_run(root, geometry, subject, 1, amount, rng))
        if i % 4 == 0:  # a second session for some subjects
            entries.append(write_run(root, geometry, subject, 1, amount, rng, session="2"))
        rows.append({"participant_id": f"sub-{subject}", "DX": dx, "site": "ABC"[i % 3],
                     "score": f"{amount + rng.normal(scale=0.1):.3f}"})
    entries.append(write_run(root, geometry, "00", 2, 0.0, rng, n_frames=6))  # too short
    rows.append({"participant_id": "sub-99", "DX": "1", "site": "A", "score": "1"})  # no run
    table = pd.DataFrame(rows).set_index(
        pd.Index([r["participant_id"][4:] for r in rows], name="participant"))
    pretrained = save_pretrained(root / "models" / "pre" / "model.pt", geometry, seed=0)
    return {"root": root, "geometry": geometry, "entries": entries, "table": table,
            "pretrained": pretrained}


@pytest.fixture(scope="module")
def probe_run(study):
    labels, _ = parse_labels(study["table"], "dx", positive=["1"])
    result = run_finetune(study["entries"], labels, study["pretrained"], make_cfg(),
                          study["root"], device="cpu")
    return result


@pytest.fixture(scope="module")
def frozen(study):
    """Pretrained encoder, windows per subject and their frozen embeddings."""
    encoder = load_model(study["pretrained"], kind="pretrain").model
    refs = subject_windows(study["entries"], 8, 2)
    return encoder, refs, frozen_embeddings(encoder, refs, make_cfg(), "cpu")


def test_window_starts_are_evenly_spaced_inside_the_run():
    assert list(window_starts(20, 8, 3)) == [0, 6, 12]
    assert list(window_starts(8, 8, 4)) == [0]
    assert window_starts(6, 8, 2).size == 0
    assert list(window_starts(10, 8, 5)) == [0, 1, 2]


def test_windows_follow_their_subject(study):
    refs = subject_windows(study["entries"], 8, 2)
    assert len(refs["00"]) == 4  # two sessions x two windows; the 6-frame run gives none
    assert all(entry.subject == s for s, rs in refs.items() for entry, _ in rs)
    windows = load_windows(refs["01"], 8)
    assert windows.shape == (2, 8, study["geometry"].n_tokens, 27)
    assert windows.dtype == np.float32


def test_linear_probe_finds_the_planted_difference(probe_run, study):
    assert probe_run["metrics"]["accuracy"]["mean"] > 0.85
    assert probe_run["metrics"]["roc_auc"]["mean"] > 0.9
    assert probe_run["n_subjects"] == N_SUBJECTS and probe_run["n_folds"] == 3
    assert probe_run["n_repeats"] == 5  # the default: 5 shuffles of the folds
    assert probe_run["excluded"]["labelled_without_runs"] == 1  # sub-99
    model_dir = probe_run["model_dir"]
    assert model_dir.name == "pre_ft-DX_linear-probe"
    folds = pd.read_csv(model_dir / "fold_metrics.tsv", sep="\t", dtype={"fold": str})
    assert list(folds["fold"]) == ["0", "1", "2"] * 5 + ["mean", "sd"]
    assert list(folds["repeat"].iloc[:15]) == [r for r in range(5) for _ in range(3)]
    for r in range(5):  # every repeat tests every subject once
        assert folds.loc[folds["repeat"] == r, "n_test"].sum() == N_SUBJECTS
    # The planted effect is found out of fold, and the AUC interval says so.
    oof = probe_run["out_of_fold"]
    assert oof.above_chance and oof.roc_auc.low > 0.5 and oof.n_repeats == 5
    saved = json.loads((model_dir / "metrics.json").read_text())["out_of_fold"]
    assert saved["above_chance"] and saved["n_subjects"] == N_SUBJECTS
    # the connectome baseline ran on the same folds, beside the model
    summary = json.loads((model_dir / "metrics.json").read_text())
    assert summary["baseline"]["name"] == "connectome" and summary["readout"] == "region"
    assert 0.0 <= summary["baseline"]["metrics"]["accuracy"]["mean"] <= 1.0
    assert oof.baseline is not None and oof.baseline_name == "connectome"
    base = pd.read_csv(model_dir / "baseline_predictions.tsv", sep="\t")
    model = pd.read_csv(model_dir / "predictions.tsv", sep="\t")
    assert base.set_index("participant_id")["fold"].equals(
        model.set_index("participant_id")["fold"])


def test_region_sd_baseline_sits_beside_the_model_on_the_same_folds(study, tmp_path):
    labels, _ = parse_labels(study["table"], "dx", positive=["1"])
    cfg = make_cfg()
    cfg.finetune.baseline, cfg.finetune.cv_repeats = "region-sd", 1
    result = run_finetune(study["entries"], labels, study["pretrained"], cfg, tmp_path,
                          device="cpu")
    summary = json.loads((result["model_dir"] / "metrics.json").read_text())
    assert summary["baseline"]["name"] == "region-sd"
    assert summary["baseline"]["connectivity"] is None
    assert "region SD" in summary["baseline"]["description"]
    assert "connectivity" not in summary["baseline"]["description"]
    assert result["out_of_fold"].baseline_name == "region-sd"
    base = pd.read_csv(result["model_dir"] / "baseline_predictions.tsv", sep="\t")
    model = pd.read_csv(result["model_dir"] / "predictions.tsv", sep="\t")
    assert set(base["model"]) == {"region-sd"}
    assert base.set_index("participant_id")["fold"].equals(
        model.set_index("participant_id")["fold"])


def test_out_of_fold_predictions_are_per_participant_and_subject_disjoint(probe_run, study):
    rows = probe_run["predictions"]
    assert sorted(rows["participant_id"]) == [f"sub-{i:02d}" for i in range(N_SUBJECTS)]
    # Re-create the folds: every subject (with all its sessions) is tested exactly once,
    # in the fold that the output says, and never trained on in that fold.
    labels, _ = parse_labels(study["table"].drop(index="99"), "dx", positive=["1"])
    folds = make_folds(labels.to_numpy(), 3, seed=0)
    for k, (train, test) in enumerate(folds):
        tested = set(labels.index[test])
        assert not tested & set(labels.index[train])
        assert tested == {p[4:] for p in rows.loc[rows["fold"] == k, "participant_id"]}
    path = study["root"] / "sub-00" / "func" / "sub-00_desc-finetune_predictions.tsv"
    one = pd.read_csv(path, sep="\t")
    assert one.loc[0, "model"] == "pre_ft-DX_linear-probe" and one.loc[0, "n_windows"] == 4
    assert one.loc[0, "true_label"] == "negative"
    assert 0.0 <= one.loc[0, "probability"] <= 1.0
    assert path.with_suffix(".json").is_file()


def test_no_cross_validated_subject_is_attributed_by_a_model_that_trained_on_it(probe_run,
                                                                                study):
    loaded = load_model(probe_run["model_path"], kind="finetune")
    assert len(loaded.fold_models) == 3
    assert set(loaded.meta.trained_subjects) == {f"{i:02d}" for i in range(N_SUBJECTS)}
    rows = probe_run["predictions"].set_index("participant_id")
    refs = subject_windows(study["entries"], 8, 2)
    for i in range(N_SUBJECTS):
        subject = f"{i:02d}"
        clf, fold = loaded.classifier_for(f"sub-{subject}")
        assert fold is not None and clf is fold.classifier and clf is not loaded.model
        # The fold model tested this subject, so it never trained on it ...
        assert subject in fold.test_subjects and fold.fold == rows.loc[f"sub-{subject}", "fold"]
        others = [f for f in loaded.fold_models if f is not fold]
        assert all(subject not in f.test_subjects for f in others)
        # ... and it is the very model that made the out-of-fold prediction.
        windows = torch.from_numpy(load_windows(refs[subject], 8))
        with torch.no_grad():
            prob = torch.sigmoid(clf(windows).mean()).item()
        assert prob == pytest.approx(rows.loc[f"sub-{subject}", "probability"], abs=1e-4)
    # Fold models share the refit model's frozen encoder (only heads are stored).
    assert all(f.classifier.encoder is loaded.model.encoder for f in loaded.fold_models)
    new, fold = loaded.classifier_for("sub-new")
    assert new is loaded.model and fold is None


def test_shuffled_labels_stay_at_chance(study, frozen):
    cfg = make_cfg()
    encoder, refs, emb = frozen
    labels, info = parse_labels(study["table"].drop(index="99"), "dx", positive=["1"])
    accuracies = []
    for seed in range(3):
        shuffled = pd.Series(np.random.default_rng(seed).permutation(labels.to_numpy()),
                             index=labels.index)
        folds = make_folds(shuffled.to_numpy(), 3, seed=seed)
        _, table = cross_validate(encoder, shuffled, refs, cfg, info, folds, "cpu", emb)
        accuracies.append(table.loc["mean", "balanced_accuracy"])
    assert np.mean(accuracies) < 0.7
    _, real = cross_validate(encoder, labels, refs, cfg, info,
                             make_folds(labels.to_numpy(), 3, seed=0), "cpu", emb)
    assert real.loc["mean", "balanced_accuracy"] > np.mean(accuracies) + 0.2


def test_probe_classifier_reproduces_scikit_learn_and_is_differentiable(study):
    from sklearn.linear_model import LogisticRegression

    encoder = load_model(study["pretrained"], kind="pretrain").model
    refs = subject_windows(study["entries"], 8, 2)
    subjects = sorted(refs)
    y = np.array([int(s) % 2 for s in subjects])
    window_emb = {s: embed_windows(encoder, refs[s], 8, 8, "cpu") for s in subjects}
    features = np.stack([window_emb[s].mean(0) for s in subjects])
    probe = fit_linear_probe(features, y, "binary", seed=0)
    z = (features - features.mean(0)) / features.std(0)
    reference = LogisticRegression(C=probe["penalty"], class_weight="balanced",
                                   max_iter=2000).fit(z, y)
    clf = probe_classifier(encoder, probe, {"task_type": "binary",
                                            "classes": ["negative", "positive"]})
    windows = torch.from_numpy(load_windows(refs["03"], 8)).requires_grad_(True)
    logits = clf(windows)
    assert logits.shape == (len(refs["03"]), 1)
    # Mean window logit == the linear model's logit of the mean embedding.
    expected = reference.decision_function(z[subjects.index("03")][None])[0]
    assert logits.mean().item() == pytest.approx(expected, abs=1e-3)
    logits.sum().backward()
    assert windows.grad is not None and windows.grad.abs().sum() > 0


def test_load_finetuned_rebuilds_the_model_and_predicts_a_new_subject(probe_run, study,
                                                                      tmp_path):
    loaded = load_model(probe_run["model_path"], kind="finetune")
    clf, cfg, geometry = loaded.model, loaded.cfg, loaded.geometry
    assert loaded.meta.kind == "finetune" and loaded.meta.atlas.name == "toy"
    assert loaded.meta.head is not None and loaded.meta.strategy == "linear-probe"
    assert clf.label_info["positive"] == ["1"] and clf.label_info["target"] == "DX"
    assert geometry.n_tokens == study["geometry"].n_tokens
    rng = np.random.default_rng(42)  # unseen subjects in a dataset of their own
    for subject, amount, expected in (("new1", OFFSET, "positive"), ("new0", 0.0, "negative")):
        entries = [write_run(tmp_path, geometry, subject, 1, amount, rng),
                   write_run(tmp_path, geometry, subject, 2, amount, rng, n_frames=12)]
        out = predict_subject(clf, entries, cfg, "cpu")
        assert out["label"] == expected
        # the default region readout: 4 atlas regions x 32 encoder features
        assert out["n_windows"] == 4 and out["embedding"].shape == (4 * 32,)
        assert out["probabilities"]["positive"] == pytest.approx(out["probability"])
    with pytest.raises(BadDataError, match="pretrained model: pass it with --pretrained"):
        load_model(study["pretrained"], kind="finetune")  # not a fine-tuned one
    with pytest.raises(BadDataError, match="fine-tuned model: pass it with --model"):
        load_model(probe_run["model_path"], kind="pretrain")


def test_head_and_full_strategies(study):
    labels, _ = parse_labels(study["table"], "dx", positive=["1"])
    subset = [e for e in study["entries"] if int(e.subject) < 12 and e.session is None]
    before = load_checkpoint(study["pretrained"])["model"]
    for strategy in ("head", "full"):
        cfg = make_cfg(strategy, folds=2)
        cfg.finetune.head = "mlp" if strategy == "head" else "linear"
        cfg.finetune.windows_per_run, cfg.finetune.epochs = 1, 2
        result = run_finetune(subset, labels, study["pretrained"], cfg, study["root"],
                              device="cpu")
        assert result["n_folds"] == 2 and result["n_subjects"] == 12
        assert 0.0 <= result["metrics"]["accuracy"]["mean"] <= 1.0
        after = load_checkpoint(result["model_path"])["model"]
        # the region readout wraps the autoencoder: its weights are encoder.mae.*
        changed = any(not torch.equal(before[k], after[f"encoder.mae.{k}"])
                      for k in before)
        assert changed == (strategy == "full")
        loaded = load_model(result["model_path"], kind="finetune")
        clf, cfg2 = loaded.model, loaded.cfg
        out = predict_subject(clf, [e for e in subset if e.subject == "03"], cfg2, "cpu")
        assert out["n_windows"] == 1 and 0.0 <= out["probability"] <= 1.0


def test_leave_site_out(study):
    from bids_roimae.analysis.labels import parse_groups

    labels, _ = parse_labels(study["table"], "dx", positive=["1"])
    groups, _ = parse_groups(study["table"], "site")
    cfg = make_cfg()
    result = run_finetune(study["entries"], labels, study["pretrained"], cfg,
                          study["root"], device="cpu", groups=groups, name="bysite")
    assert result["n_folds"] == 3
    rows = result["predictions"]
    sites = study["table"].set_index("participant_id").loc[rows["participant_id"], "site"]
    assert all(len(set(sites[rows["fold"].to_numpy() == k])) == 1 for k in range(3))


def test_regression_and_multiclass_probes(study, frozen):
    encoder, refs, emb = frozen
    table = study["table"].drop(index="99")
    score, info = parse_labels(table, "score", task_type="regression")
    _, reg = cross_validate(encoder, score, refs, make_cfg(), info,
                            make_folds(score.to_numpy(), 3, 0, "regression"), "cpu", emb)
    assert reg.loc["mean", "pearson_r"] > 0.8
    table = table.assign(DX=[str(int(s) % 2 + (int(s) % 4 == 3)) for s in table.index])
    multi, info = parse_labels(table, "dx", task_type="multiclass")
    predictions, _ = cross_validate(encoder, multi, refs, make_cfg(), info,
                                    make_folds(multi.to_numpy(), 3, 0), "cpu", emb)
    assert all(np.asarray(p).shape == (3,) for p in predictions["output"])


@pytest.fixture(scope="module")
def seeds(study):
    """Two random-masking seeds besides the roi model (seed 0)."""
    root, geometry = study["root"], study["geometry"]
    return {"roi-seed0": study["pretrained"],
            "random-seed1": save_pretrained(root / "models" / "r1" / "model.pt", geometry, 1,
                                            "random"),
            "random-seed2": save_pretrained(root / "models" / "r2" / "model.pt", geometry, 2,
                                            "random")}


def test_compare_masking_pools_seeds_on_the_same_repeated_folds(study, seeds, tmp_path):
    labels, _ = parse_labels(study["table"], "dx", positive=["1"])
    cfg = make_cfg()
    cfg.finetune.cv_repeats = 2
    out = compare_masking(seeds, study["entries"], labels, cfg, tmp_path, "cpu")
    table = out["table"]
    # Difference and interval first, p second; roi - random (random is the reference).
    assert list(table.columns[3:7]) == ["estimate", "ci_low", "ci_high", "p"]
    assert {"roi", "connectome"} <= set(table["model"]) and "random" in set(table["reference"])
    tests = set(table["test"])
    assert {"Nadeau-Bengio corrected resampled t-test", "DeLong test of correlated AUCs"} <= tests
    assert any(t.startswith("paired bootstrap") for t in tests)
    nb = table[table["test"].str.startswith("Nadeau")].set_index("metric")
    assert (nb["n"] == 6).all()  # 2 repeats x 3 folds
    assert (nb["ci_low"] <= nb["estimate"]).all() and (nb["estimate"] <= nb["ci_high"]).all()
    spread = out["spread"].set_index(["group", "metric"])
    assert spread.loc[("random", "accuracy"), "n_seeds"] == 2
    assert np.isfinite(spread.loc[("random", "accuracy"), "sd_between_seeds"])
    assert np.isnan(spread.loc[("roi", "accuracy"), "sd_between_seeds"])  # one seed
    # Every arm is tested on the same subjects in each (repeat, fold).
    folds = {arm: pd.read_csv(tmp_path / f"predictions_{arm}.tsv", sep="\t")
             .set_index(["repeat", "participant"])["fold"] for arm in seeds}
    assert folds["roi-seed0"].equals(folds["random-seed1"])
    assert folds["roi-seed0"].equals(folds["random-seed2"])
    # the built-in connectome baseline is one more arm on the same folds
    baseline = pd.read_csv(tmp_path / "predictions_connectome.tsv", sep="\t")
    assert folds["roi-seed0"].equals(baseline.set_index(["repeat", "participant"])["fold"])
    assert len(out["folds"]) == 2 and out["folds"][0] != out["folds"][1]
    png = out["paths"]["figure"].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_compare_masking_names_the_region_sd_baseline_arm(study, seeds, tmp_path):
    labels, _ = parse_labels(study["table"], "dx", positive=["1"])
    cfg = make_cfg()
    cfg.finetune.cv_repeats, cfg.finetune.baseline = 1, "region-sd"
    two = {k: seeds[k] for k in ("roi-seed0", "random-seed1")}
    out = compare_masking(two, study["entries"], labels, cfg, tmp_path, "cpu")
    assert "region-sd" in set(out["table"]["model"])
    assert "connectome" not in set(out["table"]["model"])
    baseline = pd.read_csv(tmp_path / "predictions_region-sd.tsv", sep="\t")
    roi = pd.read_csv(tmp_path / "predictions_roi-seed0.tsv", sep="\t")
    assert baseline.set_index("participant")["fold"].equals(
        roi.set_index("participant")["fold"])
    assert not (tmp_path / "predictions_connectome.tsv").exists()


def test_compare_masking_on_shuffled_labels_finds_no_difference(study, seeds, tmp_path):
    labels, _ = parse_labels(study["table"].drop(index="99"), "dx", positive=["1"])
    shuffled = pd.Series(np.random.default_rng(5).permutation(labels.to_numpy()),
                         index=labels.index, name=labels.name)
    shuffled.attrs = labels.attrs
    cfg = make_cfg()
    cfg.finetune.cv_repeats = 3
    table = compare_masking(seeds, study["entries"], shuffled, cfg, tmp_path, "cpu")["table"]
    assert ((table["ci_low"] <= 0) & (table["ci_high"] >= 0)).all(), table
    assert (table["p"] > 0.05).all()


def test_compare_masking_refuses_models_that_differ_in_more_than_masking(study, tmp_path):
    root, geometry = study["root"], study["geometry"]
    other = save_pretrained(root / "models" / "big" / "model.pt", geometry, 3, "random",
                            model__preset="small", train__steps=999)
    labels, _ = parse_labels(study["table"], "dx", positive=["1"])
    models = {"roi-seed0": study["pretrained"], "random-seed3": other}
    with pytest.raises(UsageError, match=r"model\.preset .*train\.steps") as err:
        compare_masking(models, study["entries"], labels, make_cfg(), tmp_path, "cpu")
    assert err.value.exit_code == 64 and "\n" not in str(err.value)
    assert "masking.strategy" not in str(err.value) and "seed (" not in str(err.value)
    cfg = make_cfg()
    cfg.finetune.cv_repeats = 1
    out = compare_masking(models, study["entries"], labels, cfg, tmp_path, "cpu",
                          allow_mismatch=True)
    assert [m.split(" ")[0] for m in out["mismatch"]] == ["model.preset", "train.steps"]
    saved = json.loads(out["paths"]["json"].read_text())
    assert saved["meta"]["mismatch"] == out["mismatch"]


def test_cache_made_with_another_geometry_is_refused(study, tmp_path):
    geometry = make_geometry(patch_size=2)
    entries = [write_run(tmp_path, geometry, f"{i:02d}", 1, 0.0, np.random.default_rng(i))
               for i in range(4)]
    labels, _ = parse_labels(study["table"], "dx", positive=["1"])
    with pytest.raises(BadDataError, match="geometry"):
        run_finetune(entries, labels, study["pretrained"], make_cfg(), tmp_path)


@pytest.mark.parametrize("head", ["linear", "mlp"])
def test_trained_head_finds_the_planted_difference(study, frozen, head):
    cfg = make_cfg("head")
    cfg.finetune.head, cfg.finetune.epochs = head, 20
    encoder, refs, emb = frozen
    labels, info = parse_labels(study["table"].drop(index="99"), "dx", positive=["1"])
    predictions, table = cross_validate(encoder, labels, refs, cfg, info,
                                        make_folds(labels.to_numpy(), 3, seed=0), "cpu", emb)
    assert table.loc["mean", "balanced_accuracy"] > 0.85
    assert predictions["n_windows"].loc["00"] == 4
