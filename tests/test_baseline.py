"""The connectome baseline and the region readout: voxel-exact regions, same folds.

Data: a 13x17x11 grid in 3^3 patches whose 4 atlas regions cut through patches (so
voxel-exact and patch-majority regions differ); positive subjects' region 1 fluctuates
more and follows the shared signal less (the planted effect of the example generator).
"""

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from bids_roimae.analysis.connectome import (
    ConnectomeFeatures,
    RegionSDFeatures,
    baseline_features,
    region_series,
)
from bids_roimae.analysis.evaluation import make_folds
from bids_roimae.core.geometry import build_geometry
from bids_roimae.core.region_weights import region_weights, voxel_region_matrix
from bids_roimae.errors import BadDataError, UsageError
from bids_roimae.model.mae import RoiMAE
from bids_roimae.model.readout import (
    ReadoutEncoder,
    build_readout,
    readout_dim,
    region_sd,
)
from bids_roimae.training.baseline import cross_validate_baseline
from bids_roimae.training.finetune import readout_encoder

torch.set_num_threads(1)


def make_geometry(rule: str = "exact"):
    shape = (13, 17, 11)
    ijk = np.indices(shape).transpose(1, 2, 3, 0)
    centre = (np.array(shape) - 1) / 2
    mask = (((ijk - centre) / (centre * 0.9)) ** 2).sum(-1) <= 1
    labels = np.where(mask, 1 + (ijk[..., 0] > 6) + 2 * (ijk[..., 2] > 4), 0)
    return build_geometry(mask, np.diag([2.0, 2.0, 2.0, 1.0]), labels, 3, rule)


@pytest.fixture(scope="module")
def geometry():
    return make_geometry()


def subject_tokens(geometry, rng, planted, n_frames=60):
    """(T, N, P) tokens: regions share one signal; region 1 of planted subjects fluctuates
    twice as much and is coupled half as strongly."""
    shared = rng.normal(size=n_frames)
    tokens = rng.normal(scale=0.5, size=(n_frames, geometry.n_tokens, geometry.patch_voxels))
    for region in (1, 2, 3, 4):
        own = rng.normal(size=n_frames)
        c = 0.35 if planted and region == 1 else 0.8
        amp = 2.0 if planted and region == 1 else 1.0
        signal = amp * (c * shared + np.sqrt(1 - c ** 2) * own)
        tokens += signal[:, None, None] * (geometry.labels == region)[None]
    return (tokens * geometry.voxel_mask).astype(np.float32)


def test_region_weights_are_voxel_exact():
    # Patch tokens (the majority rule) mix regions; region-split tokens hold one each.
    assert (region_weights(make_geometry().labels, make_geometry().voxel_mask)
            .voxel_counts > 0).sum(axis=1).max() == 1
    geometry = make_geometry(rule="majority")
    weights = region_weights(geometry.labels, geometry.voxel_mask)
    assert list(weights.region_ids) == [1, 2, 3, 4]
    brain = geometry.voxel_mask
    for r, region in enumerate(weights.region_ids):
        assert weights.region_voxels[r] == int(((geometry.labels == region) & brain).sum())
    np.testing.assert_allclose(weights.token_weights.sum(axis=0), 1.0, rtol=1e-6)
    # Some token holds voxels of two regions: exact weights are not a majority vote.
    assert ((weights.voxel_counts > 0).sum(axis=1) > 1).any()
    with pytest.raises(BadDataError, match=r"\[7\].*cannot be read out"):
        region_weights(geometry.labels, geometry.voxel_mask, [1, 7])


def test_region_series_are_means_over_each_regions_own_voxels(geometry):
    rng = np.random.default_rng(0)
    tokens = rng.normal(size=(5, geometry.n_tokens, geometry.patch_voxels)).astype(np.float32)
    matrix = voxel_region_matrix(geometry.labels, geometry.voxel_mask, np.array([2, 4]))
    series = region_series(tokens, matrix)
    assert series.shape == (5, 2)
    for col, region in enumerate((2, 4)):
        own = (geometry.labels == region) & geometry.voxel_mask
        np.testing.assert_allclose(series[:, col], tokens[:, own].mean(axis=1), rtol=1e-5)


def test_connectome_baseline_finds_the_planted_effect_on_given_folds(geometry):
    rng = np.random.default_rng(1)
    matrix = voxel_region_matrix(geometry.labels, geometry.voxel_mask, np.arange(1, 5))
    y = np.array([0, 1] * 10)
    labels = pd.Series(y, index=pd.Index([f"{i:02d}" for i in range(20)], name="participant"))
    series = {s: [region_series(subject_tokens(geometry, rng, bool(v)), matrix)]
              for s, v in labels.items()}
    folds = make_folds(y, 4, seed=0)
    for kind in ("correlation", "tangent"):
        predictions, table = cross_validate_baseline(series, labels, {"task_type": "binary"},
                                                     folds, kind=kind, seed=0)
        assert list(predictions.columns) == ["fold", "y_true", "output", "n_windows"]
        assert predictions.loc["00", "n_windows"] == 60
        for k, (_, test) in enumerate(folds):  # the folds given, not new ones
            assert set(predictions.index[predictions["fold"] == k]) == set(labels.index[test])
        assert table.loc["mean", "accuracy"] >= 0.85, kind
    shuffled = pd.Series(np.random.default_rng(3).permutation(y), index=labels.index)
    _, table = cross_validate_baseline(series, shuffled, {"task_type": "binary"},
                                       make_folds(shuffled.to_numpy(), 4, seed=0), seed=0)
    assert table.loc["mean", "accuracy"] < 0.75


def test_region_sd_baseline_is_the_region_sds_and_finds_an_amplitude_effect(geometry):
    rng = np.random.default_rng(4)
    matrix = voxel_region_matrix(geometry.labels, geometry.voxel_mask, np.arange(1, 5))
    runs = [region_series(subject_tokens(geometry, rng, planted), matrix)
            for planted in (False, True)]
    features = RegionSDFeatures().fit(runs).transform(runs)
    assert features.shape == (2, 4)
    np.testing.assert_allclose(features, [r.std(axis=0, ddof=1) for r in runs])
    assert features[1, 0] > 1.5 * features[0, 0]  # region 1 fluctuates twice as much
    # the connectome's last R columns are the same SDs, behind its correlations
    conn = ConnectomeFeatures().fit(runs).transform(runs)
    assert conn.shape == (2, 6 + 4)
    np.testing.assert_allclose(conn[:, 6:], features)
    with pytest.raises(ValueError, match="connectome or region-sd"):
        baseline_features("sd")

    y = np.array([0, 1] * 10)
    labels = pd.Series(y, index=pd.Index([f"{i:02d}" for i in range(20)], name="participant"))
    series = {s: [region_series(subject_tokens(geometry, rng, bool(v)), matrix)]
              for s, v in labels.items()}
    folds = make_folds(y, 4, seed=0)
    predictions, table = cross_validate_baseline(series, labels, {"task_type": "binary"},
                                                 folds, features="region-sd", seed=0)
    assert table.loc["mean", "accuracy"] >= 0.9
    for k, (_, test) in enumerate(folds):
        assert set(predictions.index[predictions["fold"] == k]) == set(labels.index[test])
    with pytest.raises(BadDataError, match="region-sd baseline: fold 0 trains on one class"):
        cross_validate_baseline(series, labels, {"task_type": "binary"},
                                [(np.arange(0, 20, 2), np.arange(1, 20, 2))],
                                features="region-sd")


def test_baseline_refuses_one_class_and_missing_subjects(geometry):
    rng = np.random.default_rng(2)
    matrix = voxel_region_matrix(geometry.labels, geometry.voxel_mask, np.arange(1, 5))
    labels = pd.Series([0, 0, 1, 1], index=["a", "b", "c", "d"])
    series = {s: [region_series(subject_tokens(geometry, rng, False, 20), matrix)]
              for s in labels.index}
    one_class = [(np.array([0, 1]), np.array([2, 3])), (np.array([2, 3]), np.array([0, 1]))]
    with pytest.raises(BadDataError, match="one class"):
        cross_validate_baseline(series, labels, {"task_type": "binary"}, one_class)
    with pytest.raises(BadDataError, match="no prepared run for sub-d"):
        cross_validate_baseline({k: v for k, v in series.items() if k != "d"}, labels,
                                {"task_type": "binary"}, one_class)
    with pytest.raises(BadDataError, match="3 frames"):
        ConnectomeFeatures().fit([np.zeros((2, 4))])


@pytest.mark.parametrize("readout", ["mean", "region", "region-cov"])
def test_readouts_pool_encoder_tokens_per_region(geometry, readout):
    torch.manual_seed(0)
    mae = RoiMAE(geometry.centres_mm, geometry.voxel_mask, 2, 3, embed_dim=16, depth=1,
                 num_heads=2, decoder_dim=8, decoder_depth=1, decoder_heads=2)
    encoder = build_readout(mae, readout, geometry).eval()
    x = torch.randn(2, 6, geometry.n_tokens, geometry.patch_voxels)
    features = encoder.embed(x)
    assert features.shape == (2, readout_dim(readout, 16, 4))
    if readout == "mean":
        assert encoder is mae
        return
    assert isinstance(encoder, ReadoutEncoder) and encoder.embed_dim == features.shape[1]
    tokens = mae.encode(x)  # (B, T', N, D)
    weights = region_weights(geometry.labels, geometry.voxel_mask)
    counts = torch.as_tensor(weights.voxel_counts[:, 2], dtype=torch.float32)
    expected = (tokens * counts[None, None, :, None]).sum(2) / counts.sum()  # region 3
    np.testing.assert_allclose(features[:, 2 * 16:3 * 16].detach().numpy(),
                               expected.mean(1).detach().numpy(), rtol=1e-4, atol=1e-5)
    assert not any(k.startswith("token_weights") for k in encoder.state_dict())
    if readout == "region-cov":
        corr = features[:, 4 * 16:].detach().numpy()
        assert corr.shape == (2, 6) and np.all(np.abs(corr) <= 1 + 1e-5)


def test_region_sd_readout_keeps_how_strongly_a_region_fluctuates(geometry):
    """``region-sd``: the across-time SD of region-pooled tokens before the final norm.
    Tripling one region's fluctuations raises that region's SD features far more than the
    others', which the time-averaged ``region`` readout after the norm cannot show."""
    torch.manual_seed(0)
    mae = RoiMAE(geometry.centres_mm, geometry.voxel_mask, 2, 3, embed_dim=16, depth=1,
                 num_heads=2, decoder_dim=8, decoder_depth=1, decoder_heads=2).eval()
    encoder = build_readout(mae, "region-sd", geometry)
    x = torch.randn(2, 6, geometry.n_tokens, geometry.patch_voxels)
    with torch.no_grad():
        features = encoder.embed(x)
        weights = region_weights(geometry.labels, geometry.voxel_mask)
        pooled = torch.einsum("btnd,nr->btrd", mae.encode(x, normed=False),
                              torch.as_tensor(weights.token_weights, dtype=torch.float32))
        np.testing.assert_allclose(features.numpy(),
                                   pooled.std(dim=1, correction=0).flatten(1).numpy(),
                                   rtol=1e-4, atol=1e-6)
        assert features.shape == (2, readout_dim("region-sd", 16, 4))
        # region 3 (column 2) fluctuates 3x more
        louder = x.clone()
        in_region = torch.as_tensor(geometry.labels == weights.region_ids[2])
        louder[:, :, in_region] *= 3
        ratio = (encoder.embed(louder) / features).reshape(2, 4, 16).mean(dim=(0, 2))
    assert ratio[2] > 1.5 and ratio[2] > 1.3 * max(ratio[0], ratio[1], ratio[3])
    one_step = RoiMAE(geometry.centres_mm, geometry.voxel_mask, 2, 1, embed_dim=16, depth=1,
                      num_heads=2, decoder_dim=8, decoder_depth=1, decoder_heads=2)
    with pytest.raises(ValueError, match="at least 2 time tokens"):
        build_readout(one_step, "region-sd", geometry)
    loaded = SimpleNamespace(model=one_step, geometry=geometry)  # what load_model returns
    with pytest.raises(UsageError, match="--readout region-sd: .*at least 2 time tokens") as err:
        readout_encoder(loaded, "region-sd", "cpu")
    assert err.value.exit_code == 64
    constant = torch.zeros(1, 3, 4, 16, requires_grad=True)  # (B, T', R, D), nothing varies
    region_sd(constant).sum().backward()  # IG differentiates here from a flat baseline
    assert torch.isfinite(constant.grad).all()
