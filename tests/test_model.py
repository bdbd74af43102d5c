"""RoiMAE shape contracts, padding isolation, loss restriction and presets."""

import numpy as np
import pytest
import torch
from ddp_worker import make_geometry, tiny_config

from bids_roimae.config import ConfigError, ModelConfig
from bids_roimae.core.geometry import window_tokens
from bids_roimae.core.masking import make_batch_masks, random_mask, tube
from bids_roimae.model.mae import build_model, resolve_model_config, visible_index

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def geometry():
    return make_geometry(patch_size=3)


def _model(geometry, **model):
    cfg = tiny_config()
    for key, value in model.items():
        setattr(cfg.model, key, value)
    torch.manual_seed(0)
    return build_model(cfg, geometry).eval()


def _window(geometry, batch=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 8, geometry.n_tokens, geometry.patch_voxels, generator=gen)
    return x * torch.as_tensor(geometry.voxel_mask)


def _roi_masks(geometry, batch, seed, count="exact"):
    return torch.as_tensor(make_batch_masks("roi", geometry, 0.5, batch, 4,
                                            np.random.default_rng(seed), count=count))


@pytest.mark.parametrize("attention", ["divided", "joint"])
def test_roi_batches_reach_sdpa_unpadded(geometry, attention, monkeypatch):
    """The default ROI count rule gives every sample the visible count of random masking:
    attention runs with no mask (the flash/efficient kernels stay eligible)."""
    import torch.nn.functional as F

    calls = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kw):
        calls.append((attn_mask, tuple(q.shape)))
        return real(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    model = _model(geometry, attention=attention)
    rng = np.random.default_rng(2)
    roi = torch.as_tensor(make_batch_masks("roi", geometry, 0.5, 6, 4, rng))
    rnd = torch.as_tensor(make_batch_masks("random", geometry, 0.5, 6, 4, rng))
    visible = (~roi[:, 0]).sum(1)
    assert (visible == visible[0]).all()
    assert torch.equal(roi.sum((1, 2)), rnd.sum((1, 2)))  # same masked fraction, exactly
    assert visible_index(roi[:, 0])[1] is None
    with torch.no_grad():
        model(_window(geometry, 6), roi)
    assert calls and all(mask is None for mask, _ in calls)
    n_vis = int(visible[0])
    expect = n_vis if attention == "divided" else n_vis * 4
    assert any(shape[2] == expect for _, shape in calls)  # the encoder saw only visible tokens
    # the legacy whole-region rule still pads, and then passes a key-padding mask
    calls.clear()
    whole = _roi_masks(geometry, 6, 0, count="whole")
    assert len(set((~whole[:, 0]).sum(1).tolist())) > 1
    with torch.no_grad():
        model(_window(geometry, 6), whole)
    assert any(mask is not None for mask, _ in calls)


@pytest.mark.parametrize("attention", ["divided", "joint"])
def test_shapes(geometry, attention):
    model = _model(geometry, attention=attention)
    x = _window(geometry, 3)
    mask = _roi_masks(geometry, 3, 0)
    loss, pred = model(x, mask)
    n, p = geometry.n_tokens, geometry.patch_voxels
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert pred.shape == (3, 4, n, 2 * p)
    assert model.encode(x).shape == (3, 4, n, 64)
    assert model.embed(x).shape == (3, 64)
    assert model.token_errors(x, mask).shape == (3, 4, n)


def test_group_time_matches_geometry_window_tokens(geometry):
    model = _model(geometry)
    x = _window(geometry, 2)
    expected = window_tokens(x.numpy(), 2)
    assert np.array_equal(model.group_time(x).numpy(), expected)


@pytest.mark.parametrize("attention", ["divided", "joint"])
def test_padding_never_influences_real_tokens(geometry, attention):
    model = _model(geometry, attention=attention)
    # two ROI masks with different visible counts -> the batch needs padding
    for seed in range(50):
        masks = _roi_masks(geometry, 2, seed, count="whole")
        counts = (~masks[:, 0]).sum(1)
        if counts[0] < counts[1]:
            break
    assert counts[0] < counts[1]
    _, valid = visible_index(masks[:, 0])
    assert valid is not None and not bool(valid.all())
    x = _window(geometry, 2)
    with torch.no_grad():
        loss_alone, pred_alone = model(x[:1], masks[:1])
        _, pred_batch = model(x, masks)
        lat_alone = model.encode(x[:1], masks[:1])
        lat_batch = model.encode(x, masks)
    assert torch.allclose(pred_alone[0], pred_batch[0], atol=1e-5)
    assert torch.allclose(lat_alone[0], lat_batch[0], atol=1e-5)
    # and the result is not trivially constant: other data gives another reconstruction
    with torch.no_grad():
        _, other = model(_window(geometry, 1, seed=5), masks[:1])
    assert not torch.allclose(other[0], pred_alone[0], atol=1e-3)


def test_hidden_tokens_do_not_reach_encoder(geometry):
    model = _model(geometry)
    x = _window(geometry, 2)
    masks = _roi_masks(geometry, 2, 3)
    changed = x.clone()
    hidden_frames = masks.repeat_interleave(2, dim=1)  # (B, W, N)
    changed[hidden_frames] += 10.0
    with torch.no_grad():
        _, pred_a = model(x, masks)
        _, pred_b = model(changed, masks)
    assert torch.allclose(pred_a, pred_b, atol=1e-5)


def test_loss_is_masked_brain_mse(geometry):
    model = _model(geometry)
    x = _window(geometry, 2)
    masks = _roi_masks(geometry, 2, 4)
    with torch.no_grad():
        loss, pred = model(x, masks)
    target = model.group_time(x)
    brain = torch.as_tensor(geometry.voxel_mask).repeat(1, 2)  # (N, F)
    weight = masks[..., None] & brain
    manual = ((pred - target) ** 2)[weight].mean()
    assert torch.allclose(loss, manual, atol=1e-6)
    assert not torch.allclose(loss, ((pred - target) ** 2).mean(), atol=1e-4)
    # values outside the brain of hidden tokens change nothing
    assert (~geometry.voxel_mask).any()
    hidden_frames = masks.repeat_interleave(2, dim=1)  # (B, W, N)
    outside_voxels = hidden_frames[..., None] & ~torch.as_tensor(geometry.voxel_mask)
    outside = x.clone()
    outside[outside_voxels] = 100.0
    assert not torch.equal(outside, x)
    with torch.no_grad():
        loss_out, _ = model(outside, masks)
        errors = model.token_errors(x, masks)
    assert torch.allclose(loss_out, loss)
    per_token = ((pred - target) ** 2 * brain).sum(-1) / brain.sum(-1)
    assert torch.allclose(errors, per_token, atol=1e-6)


def test_norm_target_normalises_brain_voxels(geometry):
    model = _model(geometry, norm_target=True)
    x = _window(geometry, 1) * 5 + 3
    target = model.targets(model.group_time(x))
    brain = torch.as_tensor(geometry.voxel_mask).repeat(1, 2)
    vals = target[0, 0, 0][brain[0]]
    assert abs(float(vals.mean())) < 1e-4 and abs(float(vals.var(unbiased=False)) - 1) < 1e-3


def test_divided_needs_tube_masks_joint_accepts_chunks(geometry):
    rng = np.random.default_rng(0)
    chunked = torch.as_tensor(make_batch_masks("random", geometry, 0.5, 2, 4, rng, per_chunk=True))
    x = _window(geometry, 2)
    with pytest.raises(ValueError, match="tube"):
        _model(geometry)(x, chunked)
    loss, _ = _model(geometry, attention="joint")(x, chunked)
    assert torch.isfinite(loss)


def test_encode_without_mask_equals_all_visible(geometry):
    model = _model(geometry)
    x = _window(geometry, 2)
    none = torch.zeros(2, 4, geometry.n_tokens, dtype=torch.bool)
    with torch.no_grad():
        assert torch.allclose(model.encode(x), model.encode(x, none))
        emb = model.embed(x)
    assert torch.allclose(emb, model.encode(x).mean(dim=(1, 2)))
    one = torch.as_tensor(tube(random_mask(geometry.n_tokens, 0.5, np.random.default_rng(0)), 4))
    with torch.no_grad():
        lat = model.encode(x, one[None].expand(2, -1, -1))
    assert (lat[:, :, one[0]] == 0).all() and (lat[:, :, ~one[0]] != 0).any()


def test_presets_and_overrides():
    small = resolve_model_config(ModelConfig(preset="small"))
    assert (small["embed_dim"], small["depth"], small["num_heads"]) == (384, 12, 6)
    assert (small["decoder_dim"], small["decoder_depth"], small["decoder_heads"]) == (256, 4, 8)
    base = resolve_model_config(ModelConfig(preset="base", depth=6))
    assert (base["embed_dim"], base["depth"], base["num_heads"]) == (768, 6, 12)
    with pytest.raises(ConfigError):
        resolve_model_config(ModelConfig(preset="huge"))
    with pytest.raises(ConfigError):
        resolve_model_config(ModelConfig(preset="tiny", embed_dim=65))


def test_learned_time_embedding_trains(geometry):
    from bids_roimae.model.mae import RoiMAE
    model = RoiMAE(geometry.centres_mm, geometry.voxel_mask, 2, 4, embed_dim=32, depth=1,
                   num_heads=2, decoder_dim=16, decoder_depth=1, decoder_heads=2,
                   time_embedding="learned")
    loss, _ = model(_window(geometry, 1), _roi_masks(geometry, 1, 0))
    loss.backward()
    assert model.pos_time.grad is not None and model.pos_time.grad.abs().sum() > 0


@pytest.mark.parametrize("attention", ["divided", "joint"])
def test_errors_and_embedding_match_the_two_separate_passes(geometry, attention):
    """One encoder pass gives what token_errors and the visible-token mean of encode give,
    also when the batch's masks hide different numbers of tokens (padding)."""
    model = _model(geometry, attention=attention)
    x = _window(geometry, 3, seed=4)
    mask = _roi_masks(geometry, 3, 5, count="whole")
    counts = mask[:, 0].sum(1)
    assert len(set(counts.tolist())) > 1  # ragged: the padded path is exercised
    with torch.no_grad():
        err, pooled = model.errors_and_embedding(x, mask)
        enc = model.encode(x, mask)
        visible = (~mask).float()[..., None]
        expected = (enc * visible).sum((1, 2)) / visible.sum((1, 2))
        torch.testing.assert_close(err, model.token_errors(x, mask))
        torch.testing.assert_close(pooled, expected, rtol=1e-5, atol=1e-6)
        none = torch.zeros_like(mask)
        _, all_visible = model.errors_and_embedding(x, none)
        torch.testing.assert_close(all_visible, model.embed(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("attention,count", [("divided", "exact"), ("joint", "exact"),
                                             ("divided", "whole"), ("joint", "whole")])
def test_training_loss_at_hidden_tokens_only_is_the_same_loss(geometry, attention, count):
    """The training path decodes the hidden tokens only: same loss and same gradients as
    reconstructing every token, also when samples hide different counts (padded rows)."""
    x = _window(geometry, 3)
    mask = _roi_masks(geometry, 3, 1, count=count)
    if attention == "joint":  # per-chunk masks differ between time steps
        mask = mask.clone()
        mask[:, 1] = torch.roll(mask[:, 1], 1, dims=-1)
    grads = []
    for return_pred in (True, False):
        model = _model(geometry, attention=attention).train()
        loss, pred = model(x, mask, return_pred=return_pred)
        loss.backward()
        assert (pred is None) == (not return_pred)
        grads.append((loss.item(), [p.grad.clone() for p in model.parameters()
                                    if p.grad is not None]))
    (full, full_grads), (hidden, hidden_grads) = grads
    assert hidden == pytest.approx(full, rel=1e-5)
    assert len(full_grads) == len(hidden_grads)
    for a, b in zip(full_grads, hidden_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
