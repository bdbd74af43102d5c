"""Masking is pure and seeded; both strategies hide the same fraction of brain tokens."""

import numpy as np
import pytest
from ddp_worker import make_geometry

from bids_roimae.core.masking import (
    make_batch_masks,
    random_mask,
    region_groups,
    roi_mask,
    target_count,
    tube,
)


@pytest.fixture(scope="module")
def geometry():
    return make_geometry(patch_size=2)


def test_random_mask_exact_fraction():
    rng = np.random.default_rng(0)
    for n, ratio in [(100, 0.5), (1486, 0.75), (37, 0.3)]:
        mask = random_mask(n, ratio, rng)
        assert mask.shape == (n,) and mask.dtype == bool
        assert mask.sum() == round(ratio * n)


def test_groups_cover_every_brain_token_once(geometry):
    groups = region_groups(geometry)
    allidx = np.concatenate(groups.groups)
    assert groups.disjoint
    assert np.array_equal(np.sort(allidx), np.arange(geometry.n_tokens))
    # the synthetic atlas leaves an unlabelled shell: orphans exist and were attached
    assert (geometry.patch_label == 0).any()
    assert set(groups.labels.tolist()) == set(range(1, 9))


def test_roi_mask_whole_rule_within_one_region(geometry):
    groups = region_groups(geometry)
    n = geometry.n_tokens
    target = target_count(n, 0.5)
    largest = groups.sizes.max()
    for seed in range(50):
        mask = roi_mask(geometry, 0.5, np.random.default_rng(seed), count="whole")
        assert mask.shape == (n,)
        assert abs(int(mask.sum()) - target) <= largest
        for g in groups.groups:  # every region is either fully hidden or fully visible
            assert mask[g].all() or not mask[g].any()
        assert 0 < mask.sum() < n


@pytest.mark.parametrize("weighting", ["uniform", "size"])
def test_roi_mask_exact_count_one_partial_region(geometry, weighting):
    groups = region_groups(geometry)
    n = geometry.n_tokens
    partial_seen = 0
    for ratio in (0.3, 0.5, 0.75):
        target = target_count(n, ratio)
        for seed in range(30):
            mask = roi_mask(geometry, ratio, np.random.default_rng(seed), weighting)
            assert int(mask.sum()) == target == random_mask(n, ratio,
                                                            np.random.default_rng(0)).sum()
            partial = [g for g in groups.groups if mask[g].any() and not mask[g].all()]
            assert len(partial) <= 1  # every other region is whole or untouched
            partial_seen += len(partial)
            if partial:  # the partly hidden region is a compact piece: its nearest tokens
                g = partial[0]
                pos = geometry.centres_mm[g]
                hidden, shown = pos[mask[g]], pos[~mask[g]]
                spread = ((hidden[:, None] - hidden[None]) ** 2).sum(-1).max()
                assert spread <= ((pos[:, None] - pos[None]) ** 2).sum(-1).max()
                assert shown.shape[0] > 0
    assert partial_seen > 0


def test_roi_mask_hides_exactly_the_chosen_regions_voxels():
    geom = make_geometry(patch_size=3)
    labels = np.where(geom.voxel_mask, geom.labels, 0)
    for seed in range(20):
        mask = roi_mask(geom, 0.5, np.random.default_rng(seed), count="whole")
        hidden_labels = set(np.unique(labels[mask][labels[mask] > 0]).tolist())
        # every voxel of a hidden region is hidden; no voxel of another region is
        hidden_voxels = labels[mask]
        for region in hidden_labels:
            assert (labels == region).sum() == (hidden_voxels == region).sum()
        shown = labels[~mask]
        assert not set(np.unique(shown).tolist()) & hidden_labels
    # the default count rule: same, except for the single partly hidden region, whose
    # hidden voxels are its own
    for seed in range(20):
        mask = roi_mask(geom, 0.5, np.random.default_rng(seed))
        partial = [r for r in np.unique(labels[labels > 0])
                   if 0 < (labels[mask] == r).sum() < (labels == r).sum()]
        assert len(partial) <= 1
        for t in np.flatnonzero(mask):
            assert len(set(np.unique(labels[t][labels[t] > 0]).tolist())) <= 1


def test_roi_mask_with_any_rule_overlaps(geometry):
    geom_any = make_geometry(patch_size=2, rule="any")
    groups = region_groups(geom_any)
    assert not groups.disjoint
    target = target_count(geom_any.n_tokens, 0.4)
    for seed in range(20):
        mask = roi_mask(geom_any, 0.4, np.random.default_rng(seed), weighting="size")
        assert int(mask.sum()) == target
        mask = roi_mask(geom_any, 0.4, np.random.default_rng(seed), weighting="size",
                        count="whole")
        assert abs(int(mask.sum()) - target) <= groups.sizes.max()
        # drawn regions are whole: a hidden token's region is not split... at least one
        # of its regions is fully hidden
        for tok in np.flatnonzero(mask):
            assert any(mask[g].all() for g in groups.groups if tok in g)


def test_labels_vector_membership_only_masks_tokens_in_range():
    labels = np.array([1, 1, 1, 2, 2, 0, 3, 3, 3, 3, 0, 2])
    mask = roi_mask(labels, 0.5, np.random.default_rng(3), count="whole")
    assert mask.shape == labels.shape
    for r in (1, 2, 3):
        assert mask[labels == r].all() or not mask[labels == r].any()


def test_determinism_per_seed(geometry):
    for strategy in ("random", "roi"):
        a = make_batch_masks(strategy, geometry, 0.5, 4, 3, np.random.default_rng(7))
        b = make_batch_masks(strategy, geometry, 0.5, 4, 3, np.random.default_rng(7))
        c = make_batch_masks(strategy, geometry, 0.5, 4, 3, np.random.default_rng(8))
        assert np.array_equal(a, b)
        assert not np.array_equal(a, c)


@pytest.mark.parametrize("weighting", ["uniform", "size"])
def test_roi_and_random_mean_fraction_match(geometry, weighting):
    n = geometry.n_tokens
    rng = np.random.default_rng(11)
    roi = np.mean([roi_mask(geometry, 0.5, rng, weighting, "whole").sum() / n
                   for _ in range(200)])
    rnd = np.mean([random_mask(n, 0.5, rng).sum() / n for _ in range(200)])
    assert abs(rnd - 0.5) < 1e-2
    assert abs(roi - rnd) < 0.02


def test_tube_and_batch_shapes(geometry):
    n = geometry.n_tokens
    rng = np.random.default_rng(1)
    spatial = random_mask(n, 0.5, rng)
    t = tube(spatial, 5)
    assert t.shape == (5, n) and all(np.array_equal(row, spatial) for row in t)
    masks = make_batch_masks("roi", geometry, 0.5, 3, 4, rng)
    assert masks.shape == (3, 4, n)
    assert (masks == masks[:, :1]).all()  # tubes
    chunked = make_batch_masks("random", geometry, 0.5, 3, 4, rng, per_chunk=True)
    assert chunked.shape == (3, 4, n)
    assert not (chunked == chunked[:, :1]).all()  # independent per time token
    assert (chunked.sum(-1) == round(0.5 * n)).all()


def test_bad_arguments_raise(geometry):
    with pytest.raises(ValueError):
        random_mask(10, 1.0, np.random.default_rng(0))
    with pytest.raises(ValueError):
        make_batch_masks("blocks", geometry, 0.5, 1, 1, np.random.default_rng(0))
    with pytest.raises(ValueError):
        roi_mask(geometry, 0.5, np.random.default_rng(0), weighting="volume")
    with pytest.raises(ValueError):
        roi_mask(geometry, 0.5, np.random.default_rng(0), count="nearest")
