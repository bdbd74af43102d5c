"""Integrated Gradients maps, region tables and region reconstruction fidelity."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from bids_roimae.analysis.attribution import (
    COMPLETENESS_TOLERANCE,
    RULES,
    integrated_gradients,
    path_integral,
    path_rule,
)
from bids_roimae.analysis.fidelity import region_fidelity
from bids_roimae.analysis.regions import (
    region_table,
    region_values,
    scaled_region_values,
    to_source_grid,
    token_map,
)
from bids_roimae.core.geometry import build_geometry

torch.set_num_threads(1)

GRID = (13, 17, 11)
AFFINE = np.array([[-2.0, 0, 0, 12], [0, 2, 0, -18], [0, 0, 2, -10], [0, 0, 0, 1]])
WINDOW, TEMPORAL_PATCH = 8, 2


def make_mask_labels():
    """Ellipsoid brain on a 13x17x11 grid, six regions split along x, y and z."""
    ii, jj, kk = np.meshgrid(*[np.arange(s) for s in GRID], indexing="ij")
    centre = (np.array(GRID) - 1) / 2
    mask = (((ii - centre[0]) / 6) ** 2 + ((jj - centre[1]) / 8) ** 2
            + ((kk - centre[2]) / 5) ** 2) <= 1.0
    labels = (1 + (ii > centre[0]) + 2 * (jj > centre[1])).astype(np.int32)
    labels[kk > 7] = 5
    labels[(kk > 7) & (jj > 10)] = 6
    labels[~mask] = 0
    return mask, labels


def make_geometry(patch_size=3):
    mask, labels = make_mask_labels()
    return build_geometry(mask, AFFINE, labels, patch_size=patch_size)


def atlas_table():
    return pd.DataFrame({"index": [1, 2, 3, 4, 5, 6, 9],
                         "name": ["FrontL", "FrontR", "BackL", "BackR", "Cereb", "Vermis",
                                  "Absent"],
                         "system": ["frontal", "frontal", "occipital", "occipital",
                                    "cerebellum", "cerebellum", "limbic"]})


def make_windows(geometry, n_windows=3, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n_windows, WINDOW, geometry.n_tokens, geometry.patch_voxels))
    return torch.as_tensor(x * geometry.voxel_mask, dtype=torch.float32)


class TinyClassifier(nn.Module):
    """(B, W, N, P) -> (B, 1): per-voxel weights, a tanh per token, a weighted token sum."""

    def __init__(self, n_tokens, n_voxels, token_weight=None, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.voxel_w = nn.Parameter(torch.randn(n_tokens, n_voxels, generator=g) * 0.3)
        tw = torch.randn(n_tokens, generator=g) if token_weight is None else token_weight
        self.token_w = nn.Parameter(torch.as_tensor(tw, dtype=torch.float32))
        self.bias = nn.Parameter(torch.tensor(0.1))

    def forward(self, x):
        h = torch.tanh((x * self.voxel_w).sum(-1))  # (B, W, N)
        return ((h * self.token_w).mean(1).sum(-1) + self.bias)[:, None]


class TinyMAE(nn.Module):
    """Stand-in for RoiMAE: encoder on visible tokens, reconstruction from the visible mean.

    Token features are grouped by ``TEMPORAL_PATCH`` frames as the real model does.
    """

    def __init__(self, n_tokens, n_voxels, dim=8, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        feat = TEMPORAL_PATCH * n_voxels
        self.proj = nn.Parameter(torch.randn(feat, dim, generator=g) / feat ** 0.5)
        self.pos = nn.Parameter(torch.randn(n_tokens, dim, generator=g))
        self.dec = nn.Parameter(torch.randn(dim, feat, generator=g) / dim ** 0.5)

    def _tokens(self, x):
        b, w, n, p = x.shape
        t = x.reshape(b, w // TEMPORAL_PATCH, TEMPORAL_PATCH, n, p).transpose(2, 3)
        return t.reshape(b, w // TEMPORAL_PATCH, n, TEMPORAL_PATCH * p)

    def encode(self, x, mask=None):
        h = torch.tanh(self._tokens(x) @ self.proj + self.pos)
        if mask is not None:
            h = h * (~mask).unsqueeze(-1)
        return h

    def group_time(self, x):
        return self._tokens(x)

    def token_errors(self, x, mask):
        h = self.encode(x, mask)
        ctx = h.sum(2, keepdim=True) / (~mask).sum(2, keepdim=True).clamp_min(1)[..., None]
        pred = (ctx + self.pos) @ self.dec
        err = ((pred - self._tokens(x)) ** 2).mean(-1)
        return err * mask

    def errors_and_embedding(self, x, mask):
        visible = (~mask).unsqueeze(-1).float()
        pooled = (self.encode(x, mask) * visible).sum((1, 2)) / visible.sum((1, 2))
        return self.token_errors(x, mask), pooled

    def hidden_error_and_embedding(self, x, mask):
        err, pooled = self.errors_and_embedding(x, mask)
        return (err * mask).sum((1, 2)) / mask.sum((1, 2)), pooled

    def embed(self, x):
        return self.encode(x).mean((1, 2))


# -- Integrated Gradients --------------------------------------------------------------
def test_ig_completeness_within_documented_tolerance():
    geometry = make_geometry()
    model = TinyClassifier(geometry.n_tokens, geometry.patch_voxels)
    windows = make_windows(geometry, n_windows=3)
    result = integrated_gradients(model, windows, steps=32, batch_size=4)
    assert result.abs_mean.shape == (geometry.n_tokens, geometry.patch_voxels)
    assert result.delta.shape == (3,)
    assert result.max_relative_error < COMPLETENESS_TOLERANCE
    assert result.within_tolerance
    # F(x) - F(b) is the quantity being decomposed; it must not be trivially zero.
    assert np.all(np.abs(result.output - result.baseline_output) > 1e-3)
    # Windows are processed in chunks; the aggregate must not depend on the chunking.
    again = integrated_gradients(model, windows, steps=32, batch_size=64)
    np.testing.assert_allclose(again.abs_mean, result.abs_mean, rtol=1e-4, atol=1e-7)
    # Parameters keep their gradient flags (they are frozen only during attribution).
    assert all(p.requires_grad for p in model.parameters())


def test_ig_too_few_steps_is_reported_not_hidden():
    geometry = make_geometry()
    model = TinyClassifier(geometry.n_tokens, geometry.patch_voxels)
    windows = make_windows(geometry, n_windows=2) * 4  # deep in tanh saturation
    coarse = integrated_gradients(model, windows, steps=2, method="riemann_left")
    fine = integrated_gradients(model, windows, steps=48)
    assert coarse.max_relative_error > fine.max_relative_error
    assert fine.max_relative_error < COMPLETENESS_TOLERANCE


def test_ig_ranks_the_only_regions_the_model_reads_first():
    geometry = make_geometry()
    planted = {2, 5}
    reads = torch.tensor([1.0 if lab in planted else 0.0 for lab in geometry.patch_label])
    model = TinyClassifier(geometry.n_tokens, geometry.patch_voxels, token_weight=reads)
    # The model reads whole patches; a planted region's patches may hold a few voxels of
    # a neighbour, so compare with per-token labels (majority) as the model sees them.
    result = integrated_gradients(model, make_windows(geometry, 2), steps=16)
    tokens_labels = np.repeat(geometry.patch_label[:, None], geometry.patch_voxels, 1)
    table = region_table(result.abs_mean, tokens_labels, atlas_table(),
                         signed_values=result.signed_mean, mask=geometry.voxel_mask)
    top = set(table.sort_values("rank").head(2)["index"])
    assert top == planted
    unread = table[~table["index"].isin(planted) & (table["n_voxels"] > 0)]
    assert np.allclose(unread["mean_abs"], 0.0)


def test_ig_mean_baseline_and_multiclass_target():
    geometry = make_geometry()

    class TwoClass(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = TinyClassifier(geometry.n_tokens, geometry.patch_voxels, seed=1)
            self.b = TinyClassifier(geometry.n_tokens, geometry.patch_voxels, seed=2)

        def forward(self, x):
            return torch.cat([self.a(x), self.b(x) + 5.0], dim=1)  # class 1 wins

    result = integrated_gradients(TwoClass(), make_windows(geometry, 2), steps=24,
                                  baseline="mean")
    assert result.target == 1
    assert result.within_tolerance
    with pytest.raises(ValueError, match="baseline"):
        integrated_gradients(TwoClass(), make_windows(geometry, 1), baseline="blur")


# -- maps ------------------------------------------------------------------------------
def test_map_on_model_grid_keeps_data_and_source_affine(tmp_path):
    geometry = make_geometry()
    values = np.random.default_rng(1).random(geometry.voxel_mask.shape)
    img = token_map(geometry, values)
    assert img.shape == GRID
    source = nib.Nifti1Image(np.zeros(GRID + (5,), np.float32), AFFINE)
    nib.save(source, tmp_path / "bold.nii.gz")
    out = to_source_grid(img, nib.load(tmp_path / "bold.nii.gz"))  # a 4D BOLD's header
    assert out.shape == GRID
    np.testing.assert_array_equal(out.affine, AFFINE)
    np.testing.assert_array_equal(np.asarray(out.dataobj), np.asarray(img.dataobj))


def test_map_resampled_to_a_different_source_grid():
    geometry = make_geometry()
    img = token_map(geometry, np.linspace(0.5, 1.0, geometry.n_tokens))
    src_affine = np.diag([3.0, 3.0, 3.0, 1.0])
    src_affine[:3, 3] = AFFINE[:3, 3] + [-15.0, 1.0, 2.0]
    source = nib.Nifti1Image(np.zeros((9, 12, 8, 4), np.int16), src_affine)
    out = to_source_grid(img, source)
    assert out.shape == (9, 12, 8)
    np.testing.assert_array_equal(out.affine, src_affine)
    data = np.asarray(out.dataobj)
    assert 0.0 <= data.min() and data.max() <= 1.0 + 1e-6  # linear: no overshoot
    assert data.sum() > 0


# -- region tables ---------------------------------------------------------------------
def test_region_tables_sum_to_the_map():
    geometry = make_geometry()
    rng = np.random.default_rng(3)
    values = rng.random(geometry.voxel_mask.shape) * geometry.voxel_mask
    signed = values * rng.choice([-1.0, 1.0], size=values.shape)
    img = token_map(geometry, values)
    map3d = np.asarray(img.dataobj)
    _, labels3d = make_mask_labels()
    table3d = region_table(map3d, labels3d, atlas_table())
    labelled_sum = map3d[labels3d > 0].sum()
    assert np.isclose((table3d["mean_abs"] * table3d["n_voxels"]).sum(skipna=True),
                      labelled_sum, rtol=1e-6)
    tokens = region_table(values, geometry.labels, atlas_table(), signed_values=signed,
                          mask=geometry.voxel_mask)
    # Token and grid summaries agree (patches tile without overlap).
    present = tokens["n_voxels"] > 0
    np.testing.assert_allclose(tokens.loc[present, "mean_abs"],
                               table3d.loc[present, "mean_abs"], rtol=1e-5)
    assert list(tokens.columns) == ["index", "name", "system", "mean_abs", "signed_mean",
                                    "n_voxels", "rank"]
    absent = tokens.set_index("index").loc[9]
    assert absent["n_voxels"] == 0 and pd.isna(absent["rank"])
    ok = tokens.loc[present]
    assert (ok["signed_mean"].abs() <= ok["mean_abs"] + 1e-12).all()
    assert sorted(tokens.loc[present, "rank"].astype(int)) == list(range(1, present.sum() + 1))


def test_region_table_keeps_labels_missing_from_the_table():
    labels = np.array([[1, 1, 7], [7, 0, 2]])
    values = np.array([[1.0, 3.0, 5.0], [7.0, 100.0, 2.0]])
    table = region_table(values, labels, atlas_table().iloc[:2])
    row7 = table.set_index("index").loc[7]
    assert row7["name"] == "label-7" and row7["mean_abs"] == 6.0
    assert (table["mean_abs"] * table["n_voxels"]).sum() == 18.0


# -- region reconstruction fidelity -----------------------------------------------------
def test_region_fidelity_table_and_map():
    geometry = make_geometry()
    mae = TinyMAE(geometry.n_tokens, geometry.patch_voxels)
    windows = make_windows(geometry, n_windows=2)
    table = region_fidelity(mae, windows, geometry, table=atlas_table(), batch_size=4)
    owned = geometry.region_patches()
    assert list(table["index"]) == sorted(owned)
    assert list(table["n_tokens"]) == [owned[r].size for r in sorted(owned)]
    assert (table["error"] > 0).all() and (table["embedding_shift"] > 0).all()
    assert (table["embedding_cosine"] <= 1 + 1e-6).all()
    # Batching does not change the numbers.
    single = region_fidelity(mae, windows, geometry, batch_size=1)
    np.testing.assert_allclose(single["error"], table["error"], rtol=1e-5)
    np.testing.assert_allclose(single["embedding_shift"], table["embedding_shift"],
                               rtol=1e-5)
    # Hand check for one region in one window.
    r = int(table["index"].iloc[0])
    x = windows[:1]
    mask = torch.zeros(1, WINDOW // TEMPORAL_PATCH, geometry.n_tokens, dtype=torch.bool)
    mask[:, :, torch.as_tensor(owned[r])] = True
    with torch.no_grad():
        err = float(mae.token_errors(x, mask)[mask].mean())
    one = region_fidelity(mae, x, geometry, regions=[r])
    assert np.isclose(one["error"].iloc[0], err, rtol=1e-5)
    # Painting: every labelled voxel of region r carries r's error.
    painted = region_values(geometry, dict(zip(table["index"], table["error"])))
    sel = (geometry.labels == r) & geometry.voxel_mask
    assert np.allclose(painted[sel], table["error"].iloc[0])
    assert np.all(painted[~geometry.voxel_mask] == 0)


def test_region_fidelity_bigger_region_moves_embedding_more():
    geometry = make_geometry()
    mae = TinyMAE(geometry.n_tokens, geometry.patch_voxels)
    table = region_fidelity(mae, make_windows(geometry, 2), geometry)
    # Hiding more tokens of a mean-pooled embedding moves it more, on average.
    corr = np.corrcoef(table["n_tokens"], table["embedding_shift"])[0, 1]
    assert corr > 0
    with pytest.raises(ValueError, match="own no token"):
        region_fidelity(mae, make_windows(geometry, 1), geometry, regions=[9])


# -- the real model ---------------------------------------------------------------------
def small_roimae(geometry, attention="divided"):
    from bids_roimae.model.mae import RoiMAE

    torch.manual_seed(0)
    return RoiMAE(geometry.centres_mm, geometry.voxel_mask, TEMPORAL_PATCH,
                  WINDOW // TEMPORAL_PATCH, embed_dim=16, depth=1, num_heads=2,
                  decoder_dim=8, decoder_depth=1, decoder_heads=2, attention=attention)


def test_ig_and_fidelity_with_roimae_and_classifier():
    from bids_roimae.model.classifier import Classifier

    geometry = make_geometry()
    mae = small_roimae(geometry)
    torch.manual_seed(1)
    classifier = Classifier(mae, nn.Linear(16, 1), 16)
    windows = make_windows(geometry, 2)
    result = integrated_gradients(classifier, windows, steps=32, batch_size=8)
    assert result.max_relative_error < COMPLETENESS_TOLERANCE
    assert result.abs_mean[~geometry.voxel_mask].max() == 0  # background never attributed
    assert result.abs_mean[geometry.voxel_mask].mean() > 0
    table = region_fidelity(mae, windows, geometry, batch_size=4)
    assert len(table) == len(geometry.region_patches())
    assert (table["error"] > 0).all() and (table["embedding_shift"] > 0).all()
    # Hiding nothing would leave the embedding where it is: the pooled reference equals
    # the model's own embed() with every token visible.
    none = torch.zeros(2, WINDOW // TEMPORAL_PATCH, geometry.n_tokens, dtype=torch.bool)
    with torch.no_grad():
        np.testing.assert_allclose(mae.errors_and_embedding(windows, none)[1],
                                   mae.embed(windows), rtol=1e-5, atol=1e-6)


def test_adaptive_steps_and_captum_delta_agree():
    from captum.attr import IntegratedGradients

    geometry = make_geometry()
    model = TinyClassifier(geometry.n_tokens, geometry.patch_voxels)
    windows = make_windows(geometry, 2) * 3  # saturating: few points are not enough
    adaptive = integrated_gradients(model, windows, steps=64, min_steps=2,
                                    method="riemann_middle")
    assert adaptive.within_tolerance
    assert 2 < adaptive.steps <= 64
    fixed = integrated_gradients(model, windows, steps=adaptive.steps,
                                 method="riemann_middle")
    np.testing.assert_allclose(adaptive.abs_mean, fixed.abs_mean, rtol=1e-4, atol=1e-8)
    # The completeness gap is captum's own convergence delta.
    _, delta = IntegratedGradients(lambda x: model(x)[:, 0]).attribute(
        windows, n_steps=adaptive.steps, method="riemann_middle",
        return_convergence_delta=True)
    np.testing.assert_allclose(fixed.delta, delta.double().numpy(), rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("method", [r for r in RULES if r != "riemann_trapezoid"])
def test_path_integral_matches_captum(method):
    """The in-house integral gives captum's attributions, batched or not. (Captum's
    trapezoid weights sum to (n - 1) / n, so its rule is checked below, not against it.)"""
    from captum.attr import IntegratedGradients

    geometry = make_geometry()
    model = TinyClassifier(geometry.n_tokens, geometry.patch_voxels)
    windows = make_windows(geometry, 2) * 2
    base = windows.mean(dim=1, keepdim=True).expand_as(windows).contiguous()
    expected = IntegratedGradients(lambda x: model(x)[:, 0]).attribute(
        windows, baselines=base, n_steps=5, method=method).detach()
    for batch in (1, 3, 64):  # a window's 5 points in 5, 2 or 1 passes
        ours = path_integral(lambda x: model(x)[:, 0], windows, base, 5, method, batch)
        np.testing.assert_allclose(ours.detach().numpy(), expected.numpy(), rtol=1e-4,
                                   atol=1e-7)
    alphas, weights = path_rule(method, 5)
    assert np.isclose(weights.sum(), 1.0) and ((alphas >= 0) & (alphas <= 1)).all()


class LinearWindowModel(torch.nn.Module):
    """F(x) = sum(w * x): Integrated Gradients from zero are exactly w * x."""

    def __init__(self, weight):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.as_tensor(weight, dtype=torch.float32))

    def forward(self, x):
        return (x * self.weight).sum(dim=(1, 2, 3))[:, None]


def test_scaled_table_removes_amplitude_but_keeps_what_the_model_weighs():
    n_tokens, n_vox = 6, 5
    labels = np.repeat([[1], [1], [2], [2], [3], [3]], n_vox, axis=1)  # (N, P): 3 regions
    weight = np.ones((n_tokens, n_vox))
    weight[labels == 3] = 2.0  # the model weighs region 3 twice as much
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 7, n_tokens, n_vox))
    x -= x.mean(axis=1, keepdims=True)
    x[:, :, labels[:, 0] == 2] *= 3.0  # region 2 only fluctuates three times as much
    ig = integrated_gradients(LinearWindowModel(weight), x, steps=4)
    table = pd.DataFrame({"index": [1, 2, 3], "name": ["a", "b", "c"]})
    plain = region_table(ig.abs_mean, labels, table).set_index("index")["mean_abs"]
    scaled = pd.Series(scaled_region_values(ig.window_abs, ig.window_rms, labels, [1, 2, 3]),
                       index=[1, 2, 3])
    assert plain[2] > 2.5 * plain[1]  # amplitude in disguise
    assert scaled[2] == pytest.approx(scaled[1], rel=0.15)  # gone once scaled
    assert scaled[3] == pytest.approx(2 * scaled[1], rel=0.15)  # the weight remains
    assert ig.window_abs.shape == (3, n_tokens, n_vox) == ig.window_rms.shape


@pytest.mark.parametrize("method", RULES)
def test_every_rule_is_exact_on_a_linear_model(method):
    """F(x) = sum(w * x) has a constant gradient: IG from any baseline is w * (x - b), so
    every rule's weights must sum to 1."""
    rng = np.random.default_rng(3)
    weight = rng.normal(size=(4, 13, 6))
    model = LinearWindowModel(weight)
    x = torch.as_tensor(rng.normal(size=(2, 4, 13, 6)), dtype=torch.float32)
    base = torch.as_tensor(rng.normal(size=(2, 4, 13, 6)), dtype=torch.float32)
    ours = path_integral(lambda v: model(v)[:, 0], x, base, 3, method, 2)
    np.testing.assert_allclose(ours.detach().numpy(), weight * (x - base).numpy(),
                               rtol=1e-5, atol=1e-6)
