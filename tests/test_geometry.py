"""Token geometry on small, unequal grids (axis mix-ups must fail)."""

import numpy as np
import pytest

from bids_roimae.core.geometry import TokenGeometry, build_geometry, window_tokens

SHAPE = (13, 17, 11)


def _ellipsoid(shape=SHAPE):
    idx = np.indices(shape).astype(float)
    c = [(s - 1) / 2 for s in shape]
    r = [s / 2.2 for s in shape]
    return sum(((idx[a] - c[a]) / r[a]) ** 2 for a in range(3)) <= 1.0


def _labels(mask):
    """Three regions split along x, y and z so every axis matters."""
    lab = np.zeros(mask.shape, np.int32)
    i, j, k = np.indices(mask.shape)
    lab[(i < 6) & mask] = 5
    lab[(i >= 6) & (j < 8) & mask] = 7
    lab[(i >= 6) & (j >= 8) & mask] = 9
    lab[(k == 10) & mask] = 0  # an unlabelled slab
    return lab


AFFINE = np.array([[2, 0, 0, -12.0], [0, 2, 0, -16.0], [0, 0, 2, -10.0], [0, 0, 0, 1]])


@pytest.fixture(scope="module")
def geom():
    mask = _ellipsoid()
    return build_geometry(mask, AFFINE, _labels(mask), patch_size=3)


def test_tokens_cover_exactly_the_brain(geom):
    mask = _ellipsoid()
    painted = geom.scatter(np.ones(geom.n_tokens))
    assert painted.shape == SHAPE
    np.testing.assert_array_equal(painted > 0, mask)
    assert geom.voxel_mask.sum() == mask.sum()
    assert (geom.voxel_mask.sum(axis=1) > 0).all()  # every token touches the brain


def test_extract_puts_each_voxel_at_its_grid_position(geom):
    rng = np.random.default_rng(0)
    vol = rng.normal(size=SHAPE + (4,)).astype(np.float32)
    tok = geom.extract(vol)
    assert tok.shape == (4, geom.n_tokens, 27)
    # invert: scatter per-voxel values of frame 2 back to the grid
    back = geom.scatter(tok[2])
    mask = _ellipsoid()
    np.testing.assert_allclose(back[mask], vol[..., 2][mask])
    assert np.all(back[~mask] == 0)
    # a single voxel lands in the token whose box contains it
    i, j, k = 7, 9, 4
    t = np.flatnonzero(np.all(geom.patch_ijk == (np.array([i, j, k]) - geom.origin) // 3,
                              axis=1))[0]
    off = (np.array([i, j, k]) - geom.origin) % 3
    p = off[0] * 9 + off[1] * 3 + off[2]
    assert tok[1, t, p] == vol[i, j, k, 1]


def test_extract_3d_matches_4d(geom):
    vol = np.arange(np.prod(SHAPE), dtype=np.float32).reshape(SHAPE)
    np.testing.assert_array_equal(geom.extract(vol), geom.extract(vol[..., None])[0])


def test_region_rules(geom):
    maj = geom.region_patches()
    assert set(maj) <= {5, 7, 9}
    # majority: each patch in at most one region
    assert len(np.unique(geom.member_patch)) == len(geom.member_patch)
    anyg = build_geometry(_ellipsoid(), AFFINE, _labels(_ellipsoid()), 3, "any")
    pure = build_geometry(_ellipsoid(), AFFINE, _labels(_ellipsoid()), 3, "pure")
    assert len(anyg.member_patch) > len(geom.member_patch) > len(pure.member_patch)
    for region, patches in pure.region_patches().items():
        labs = pure.labels[patches][pure.voxel_mask[patches]]
        assert set(np.unique(labs[labs > 0])) == {region}


def test_centres_in_mm(geom):
    c = geom.centres_mm
    first = geom.origin + geom.patch_ijk[0] * 3 + 1
    np.testing.assert_allclose(c[0], AFFINE[:3, :3] @ first + AFFINE[:3, 3])


def test_round_trip_and_hashes(geom):
    again = TokenGeometry.from_arrays(geom.to_arrays())
    np.testing.assert_array_equal(again.voxel_index, geom.voxel_index)
    np.testing.assert_array_equal(again.member_region, geom.member_region)
    assert again.extraction_hash == geom.extraction_hash
    assert again.atlas_hash == geom.atlas_hash
    other = build_geometry(_ellipsoid(), AFFINE, None, patch_size=3)
    assert other.extraction_hash == geom.extraction_hash  # labels do not change tokens
    assert other.atlas_hash != geom.atlas_hash
    assert build_geometry(_ellipsoid(), AFFINE, None, 4).extraction_hash != geom.extraction_hash


def test_min_brain_fraction_drops_edge_patches():
    mask = _ellipsoid()
    full = build_geometry(mask, AFFINE, None, 3)
    core = build_geometry(mask, AFFINE, None, 3, min_brain_fraction=0.5)
    assert core.n_tokens < full.n_tokens
    assert core.brain_fraction.min() >= 0.5


def test_window_tokens_groups_frames():
    x = np.arange(8 * 5 * 2).reshape(8, 5, 2)
    w = window_tokens(x, 4)
    assert w.shape == (2, 5, 8)
    np.testing.assert_array_equal(w[1, 3], np.concatenate([x[t, 3] for t in range(4, 8)]))
    with pytest.raises(ValueError):
        window_tokens(x, 3)


def test_bad_inputs():
    with pytest.raises(ValueError):
        build_geometry(np.zeros(SHAPE), AFFINE)
    with pytest.raises(ValueError):
        build_geometry(_ellipsoid(), AFFINE, np.zeros((3, 3, 3)))
