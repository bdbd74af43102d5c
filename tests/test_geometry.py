"""Token geometry on small, unequal grids (axis mix-ups must fail)."""

import numpy as np
import pytest

from bids_roimae.core.geometry import (
    TokenGeometry,
    build_geometry,
    describe_regions,
    window_tokens,
)

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
    # a single voxel lands in the one token whose patch contains it and whose piece has it
    i, j, k = 7, 9, 4
    off = (np.array([i, j, k]) - geom.origin) % 3
    p = off[0] * 9 + off[1] * 3 + off[2]
    in_patch = np.all(geom.patch_ijk == (np.array([i, j, k]) - geom.origin) // 3, axis=1)
    owners = np.flatnonzero(in_patch & geom.voxel_mask[:, p])
    assert owners.size == 1
    assert tok[1, owners[0], p] == vol[i, j, k, 1]


def test_extract_3d_matches_4d(geom):
    vol = np.arange(np.prod(SHAPE), dtype=np.float32).reshape(SHAPE)
    np.testing.assert_array_equal(geom.extract(vol), geom.extract(vol[..., None])[0])


def test_region_rules():
    majg = build_geometry(_ellipsoid(), AFFINE, _labels(_ellipsoid()), 3, "majority")
    maj = majg.region_patches()
    assert set(maj) <= {5, 7, 9}
    # majority: each patch in at most one region
    assert len(np.unique(majg.member_patch)) == len(majg.member_patch)
    anyg = build_geometry(_ellipsoid(), AFFINE, _labels(_ellipsoid()), 3, "any")
    pure = build_geometry(_ellipsoid(), AFFINE, _labels(_ellipsoid()), 3, "pure")
    assert len(anyg.member_patch) > len(majg.member_patch) > len(pure.member_patch)
    for region, patches in pure.region_patches().items():
        labs = pure.labels[patches][pure.voxel_mask[patches]]
        assert set(np.unique(labs[labs > 0])) == {region}


def test_centres_in_mm(geom):
    majg = build_geometry(_ellipsoid(), AFFINE, _labels(_ellipsoid()), 3, "majority")
    first = majg.origin + majg.patch_ijk[0] * 3 + 1  # patch centre, as old checkpoints expect
    np.testing.assert_allclose(majg.centres_mm[0], AFFINE[:3, :3] @ first + AFFINE[:3, 3])
    # exact: a piece sits at the centroid of its own voxels (pieces of a patch differ)
    ijk = np.stack(np.unravel_index(geom.voxel_index[0][geom.voxel_mask[0]], SHAPE,
                                    order="F"), axis=1)
    np.testing.assert_allclose(geom.centres_mm[0],
                               AFFINE[:3, :3] @ ijk.mean(axis=0) + AFFINE[:3, 3])
    _, first_rows = np.unique(geom.patch_ijk, axis=0, return_index=True)
    assert np.unique(geom.centres_mm.round(6), axis=0).shape[0] == geom.n_tokens
    assert first_rows.size < geom.n_tokens  # some patch was split, yet positions differ


def test_round_trip_and_hashes(geom):
    again = TokenGeometry.from_arrays(geom.to_arrays())
    np.testing.assert_array_equal(again.voxel_index, geom.voxel_index)
    np.testing.assert_array_equal(again.member_region, geom.member_region)
    assert again.extraction_hash == geom.extraction_hash
    assert again.atlas_hash == geom.atlas_hash
    other = build_geometry(_ellipsoid(), AFFINE, None, patch_size=3)
    assert other.atlas_hash != geom.atlas_hash
    assert build_geometry(_ellipsoid(), AFFINE, None, 4).extraction_hash != geom.extraction_hash
    # one token per patch: labels do not change tokens; exact: the split follows the atlas
    majg = build_geometry(_ellipsoid(), AFFINE, _labels(_ellipsoid()), 3, "majority")
    assert other.extraction_hash == majg.extraction_hash
    assert other.extraction_hash != geom.extraction_hash


def test_exact_tokens_are_region_pieces_and_keep_every_region():
    mask = _ellipsoid()
    labels = _labels(mask)
    labels[8, 10, 5] = 11  # a one-voxel region, far smaller than a patch
    labels[3, 6, 4:6] = 12  # two voxels inside a patch of region 5
    exact = build_geometry(mask, AFFINE, labels, 3, "exact")
    majg = build_geometry(mask, AFFINE, labels, 3, "majority")
    present = set(np.unique(labels[mask & (labels > 0)]).tolist())
    assert set(exact.region_patches()) == present == set(exact.region_ids.tolist())
    assert not {11, 12} <= set(majg.region_patches())  # what the majority rule loses
    # pieces are disjoint and cover the brain once; a token holds one region only
    assert exact.voxel_mask.sum() == mask.sum()
    np.testing.assert_array_equal(exact.scatter(np.ones(exact.n_tokens)) > 0, mask)
    for t in range(exact.n_tokens):
        labs = np.unique(exact.labels[t][exact.voxel_mask[t]])
        assert (labs > 0).sum() <= 1
    # a region's tokens hold exactly its voxels (plus unlabelled ones)
    for region, tokens in exact.region_patches().items():
        painted = exact.scatter(np.isin(np.arange(exact.n_tokens), tokens).astype(float))
        np.testing.assert_array_equal((painted > 0) & (labels > 0), labels == region)
    assert exact.region_patches()[11].size == 1
    assert exact.n_tokens > majg.n_tokens == exact.n_patches
    assert "can be masked" in describe_regions(exact)


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
