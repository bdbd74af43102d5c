"""Voxel-exact regions: checkpoints record the token rule; old (patch-majority)
checkpoints still load; unknown rules are refused in one line."""

import numpy as np
import pandas as pd
import pytest
import torch
from ddp_worker import make_geometry, tiny_config

from bids_roimae.errors import BadDataError
from bids_roimae.io.checkpoint import (
    AtlasMeta,
    ModelMeta,
    load_checkpoint,
    load_model,
    read_model_info,
    save_checkpoint,
)
from bids_roimae.model.mae import build_model

torch.set_num_threads(1)
ATLAS = AtlasMeta(name="synthetic", index=tuple(range(1, 9)))


def _save(path, geometry, cfg):
    torch.manual_seed(0)
    model = build_model(cfg, geometry)
    save_checkpoint(path, model=model, cfg=cfg, geometry=geometry, meta=ModelMeta(atlas=ATLAS))
    return model


def test_checkpoint_records_the_exact_rule(tmp_path):
    geometry = make_geometry(patch_size=3)
    cfg = tiny_config()
    _save(tmp_path / "model.pt", geometry, cfg)
    cfg2, geom2, _ = read_model_info(tmp_path / "model.pt")
    assert geom2.rule == "exact" and cfg2.geometry.roi_assign == "exact"
    assert cfg2.masking.roi_count == "exact"
    assert geom2.n_tokens == geometry.n_tokens > geometry.n_patches
    np.testing.assert_array_equal(geom2.labels, geometry.labels)
    np.testing.assert_allclose(geom2.centres_mm, geometry.centres_mm)


def test_old_patch_majority_checkpoint_loads_as_it_was(tmp_path):
    """A checkpoint from before region-split tokens: majority geometry, and a config
    without the new ``masking.roi_count`` key."""
    geometry = make_geometry(patch_size=3, rule="majority")
    cfg = tiny_config()
    cfg.geometry.roi_assign = "majority"
    model = _save(tmp_path / "model.pt", geometry, cfg)
    ckpt = load_checkpoint(tmp_path / "model.pt")
    del ckpt["config"]["masking"]["roi_count"]
    torch.save(ckpt, tmp_path / "old.pt")
    loaded = load_model(tmp_path / "old.pt")
    assert loaded.geometry.rule == "majority"
    assert loaded.geometry.n_tokens == loaded.geometry.n_patches == geometry.n_tokens
    x = torch.randn(1, 8, geometry.n_tokens, geometry.patch_voxels)
    with torch.no_grad():
        assert torch.equal(loaded.model.embed(x), model.eval().embed(x))


def test_unknown_rule_is_refused_in_one_line(tmp_path):
    geometry = make_geometry(patch_size=3)
    _save(tmp_path / "model.pt", geometry, tiny_config())
    ckpt = load_checkpoint(tmp_path / "model.pt")
    ckpt["geometry"]["rule"] = "supervoxel"
    torch.save(ckpt, tmp_path / "future.pt")
    with pytest.raises(BadDataError) as err:
        load_model(tmp_path / "future.pt")
    message = str(err.value)
    assert "supervoxel" in message and "\n" not in message
    assert err.value.exit_code == 65


# -- region fidelity: every region, batched as one region at a time ---------------------
def _tiny_region_geometry():
    """The 13x17x11 test brain plus a one-voxel region and a two-voxel region, both far
    smaller than a patch (the majority rule cannot mask or score them)."""
    from bids_roimae.core.geometry import build_geometry

    base = make_geometry(patch_size=3)
    labels = base.scatter(np.where(base.voxel_mask, base.labels, 0).astype(float))
    brain = base.scatter(np.ones(base.n_tokens)) > 0
    labels = np.rint(labels).astype(np.int32)
    inside = np.argwhere(brain & (labels > 0))
    labels[tuple(inside[len(inside) // 2])] = 20
    labels[tuple(inside[len(inside) // 3])] = 21
    labels[tuple(inside[len(inside) // 3 + 1])] = 21
    return build_geometry(brain, base.affine, labels, 3, "exact"), labels, brain


@pytest.mark.parametrize("attention", ["divided", "joint"])
def test_batched_fidelity_equals_one_region_at_a_time(attention):
    from bids_roimae.analysis.fidelity import region_fidelity

    geometry, labels, brain = _tiny_region_geometry()
    present = sorted(np.unique(labels[brain & (labels > 0)]).tolist())
    assert {20, 21} <= set(present)
    cfg = tiny_config()
    cfg.model.attention = attention
    cfg.model.decoder_depth = 2  # the decoder's last block runs at the hidden tokens only
    torch.manual_seed(0)
    mae = build_model(cfg, geometry).eval()
    gen = torch.Generator().manual_seed(3)
    windows = torch.randn(2, 8, geometry.n_tokens, geometry.patch_voxels, generator=gen)
    windows = windows * torch.as_tensor(geometry.voxel_mask)
    batched = region_fidelity(mae, windows, geometry, batch_size=7)
    assert list(batched["index"]) == present  # every region in the brain, the tiny ones too
    row20 = batched.set_index("index").loc[20]
    assert row20["n_tokens"] == 1 and row20["n_voxels"] == 1
    # The reference: the full model, one (window, region) per pass, as before batching.
    owned = geometry.region_patches()
    with torch.no_grad():
        ref = mae.embed(windows)
        for j, region in enumerate(present):
            errors, shifts = [], []
            for k in range(2):
                mask = torch.zeros(1, 4, geometry.n_tokens, dtype=torch.bool)
                mask[:, :, torch.as_tensor(owned[region])] = True
                err, emb = mae.errors_and_embedding(windows[k:k + 1], mask)
                errors.append(float(err[mask].mean()))
                shifts.append(float((emb[0] - ref[k]).norm()))
            np.testing.assert_allclose(batched["error"].iloc[j], np.mean(errors), rtol=1e-5)
            np.testing.assert_allclose(batched["embedding_shift"].iloc[j], np.mean(shifts),
                                       rtol=1e-4, atol=1e-7)
    auto = region_fidelity(mae, windows, geometry)  # batch sized from free memory
    np.testing.assert_allclose(auto["error"], batched["error"], rtol=1e-5)


def test_region_tables_cover_every_region_in_the_brain():
    from bids_roimae.analysis.regions import region_table, region_values

    geometry, labels, brain = _tiny_region_geometry()
    present = sorted(np.unique(labels[brain & (labels > 0)]).tolist())
    table = pd.DataFrame({"index": present, "name": [f"r{i}" for i in present]})
    values = np.where(geometry.voxel_mask, geometry.labels.astype(float), 0.0)
    out = region_table(values, geometry.labels, table, mask=geometry.voxel_mask)
    assert list(out["index"]) == present
    assert out.set_index("index").loc[20, "n_voxels"] == 1
    np.testing.assert_allclose(out["mean_abs"], present)  # each region exactly its voxels
    painted = geometry.scatter(region_values(geometry, {20: 5.0}))
    assert (painted == 5.0).sum() == 1 and painted[labels == 20] == 5.0
