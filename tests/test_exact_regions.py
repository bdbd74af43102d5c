"""Voxel-exact regions: checkpoints record the token rule; old (patch-majority)
checkpoints still load; unknown rules are refused in one line."""

import numpy as np
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
