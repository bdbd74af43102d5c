"""Which brain tokens are hidden from the encoder: pure, seeded mask functions.

Two strategies mask the same fraction of *brain* tokens, so a comparison between them is
fair:

``random``
    exactly ``round(ratio * N)`` patches drawn uniformly;
``roi``
    atlas regions drawn at random (without replacement, weighted uniformly or by region
    size) until the target count is reached.

ROI count rule (``count``, recorded in a checkpoint's ``masking.roi_count``):

``exact`` (default)
    whole regions are hidden in draw order while they fit under the target; the region
    that would pass it is hidden **partially**: its tokens nearest to a random token of
    it (a compact piece, not scattered tokens), exactly as many as the target still
    needs. Every mask then hides exactly ``round(ratio * N)`` tokens, as random masking
    does, so a batch has one visible count: no padding, no attention mask, the fast
    attention kernels. The price: one region per draw is only partly hidden (its hidden
    part is seen next to its visible part).
``whole``
    only whole regions: the region whose addition reaches or passes the target is kept
    when that lands closer to the target than stopping before it (ties keep it), so the
    count is within one region of the target and on target on average; batches then
    differ in visible count and the encoder pads them (a key-padding mask).

At least one token is always hidden and never every brain token (the encoder needs
something to see).

With the geometry's ``exact`` rule a region's tokens hold exactly its voxels, so hiding a
region hides its voxels and no other region's. Tokens that belong to no region (patches
without any labelled voxel, 108 of 3,726 tokens for AAL3 at 6 mm) join the region(s) of
the nearest labelled token; they hold no region's voxels. Masking them as singleton
pseudo-regions would, with uniform weighting, make a large share of draws tiny scattered
patches that are trivially interpolated, which is what ROI masking is meant to avoid.
With the ``any`` rule a patch can sit in several regions; it is masked when any of them
is drawn and counted once.

A mask is boolean, ``True`` = hidden. Spatial masks are ``(N,)``; batch masks are
``(B, T', N)``; *tube* masks repeat one spatial set over the ``T'`` time tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from bids_roimae.core.geometry import TokenGeometry

STRATEGIES = ("random", "roi")
WEIGHTINGS = ("uniform", "size")
COUNT_RULES = ("exact", "whole")


@dataclass(frozen=True)
class RegionGroups:
    """Token groups that ROI masking draws from.

    Attributes
    ----------
    n_tokens : int
        Number of spatial tokens ``N``.
    groups : tuple of ndarray
        Token indices of each group (one group per region), sorted, unique.
    labels : ndarray, shape (G,)
        Region label of each group (for logs; pseudo-regions get negative labels).
    disjoint : bool
        Whether no token sits in two groups (enables a vectorised draw).
    positions : ndarray, shape (N, 3), optional
        Token positions (mm), so a partly hidden region is a compact piece of it.
    """

    n_tokens: int
    groups: tuple
    labels: np.ndarray
    disjoint: bool
    positions: Optional[np.ndarray] = None

    @property
    def sizes(self) -> np.ndarray:
        """Tokens per group, shape (G,)."""
        return np.array([g.size for g in self.groups], dtype=np.int64)


def _nearest_assignment(points: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Index into ``targets`` (M, 3) of the nearest target for each of ``points`` (U, 3)."""
    out = np.empty(points.shape[0], dtype=np.int64)
    for start in range(0, points.shape[0], 256):  # bounded memory for big grids
        chunk = points[start:start + 256]
        dist = ((chunk[:, None, :] - targets[None, :, :]) ** 2).sum(-1)
        out[start:start + 256] = np.argmin(dist, axis=1)
    return out


def region_groups(geometry_or_membership) -> RegionGroups:
    """Build the masking groups of a geometry or a plain per-token label vector.

    Parameters
    ----------
    geometry_or_membership : TokenGeometry, RegionGroups or ndarray of int, shape (N,)
        A geometry (its rule's patch-to-region membership; unlabelled patches join the
        nearest labelled patch's regions), ready groups (returned as is), or one label
        per token (0 = unlabelled, each such token becomes its own pseudo-region since
        there are no positions to find a neighbour by).

    Returns
    -------
    RegionGroups
    """
    if isinstance(geometry_or_membership, RegionGroups):
        return geometry_or_membership
    if isinstance(geometry_or_membership, TokenGeometry):
        geom = geometry_or_membership
        cached = geom._cache.get("masking_region_groups")
        if cached is not None:
            return cached
        groups = _groups_from_geometry(geom)
        geom._cache["masking_region_groups"] = groups
        return groups
    labels = np.asarray(geometry_or_membership)
    if labels.ndim != 1:
        raise ValueError(f"membership must be a TokenGeometry or labels (N,), got {labels.shape}")
    n = labels.size
    found = [(int(r), np.flatnonzero(labels == r)) for r in np.unique(labels[labels > 0])]
    found += [(-int(i) - 1, np.array([i])) for i in np.flatnonzero(labels <= 0)]
    return RegionGroups(n, tuple(g for _, g in found),
                        np.array([r for r, _ in found], np.int64), True)


def _groups_from_geometry(geom: TokenGeometry) -> RegionGroups:
    n = geom.n_tokens
    members = {int(r): list(idx) for r, idx in geom.region_patches().items()}
    in_region = np.zeros(n, bool)
    in_region[geom.member_patch] = True
    if not in_region.any():  # no atlas: every patch is its own region (= random masking)
        return region_groups(np.zeros(n, np.int64))
    orphans = np.flatnonzero(~in_region)
    if orphans.size:
        labelled = np.flatnonzero(in_region)
        nearest = labelled[_nearest_assignment(geom.patch_ijk[orphans].astype(float),
                                               geom.patch_ijk[labelled].astype(float))]
        regions_of = {}
        for p, r in zip(geom.member_patch, geom.member_region):
            regions_of.setdefault(int(p), []).append(int(r))
        for orphan, host in zip(orphans, nearest):
            for r in regions_of[int(host)]:
                members[r].append(int(orphan))
    labels = np.array(sorted(members), np.int64)
    groups = tuple(np.unique(np.asarray(members[int(r)], np.int64)) for r in labels)
    disjoint = sum(g.size for g in groups) == np.unique(np.concatenate(groups)).size
    return RegionGroups(n, groups, labels, bool(disjoint),
                        np.asarray(geom.centres_mm, np.float64))


def target_count(n_tokens: int, ratio: float) -> int:
    """Brain tokens to hide: ``round(ratio * N)`` clipped to ``[1, N - 1]``."""
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"mask ratio must be in (0, 1), got {ratio}")
    if n_tokens < 2:
        raise ValueError("masking needs at least two tokens")
    return int(min(max(round(ratio * n_tokens), 1), n_tokens - 1))


def random_mask(n_tokens: int, ratio: float, rng: np.random.Generator) -> np.ndarray:
    """Hide exactly ``round(ratio * n_tokens)`` tokens drawn uniformly.

    Returns
    -------
    ndarray of bool, shape (N,)
    """
    mask = np.zeros(n_tokens, dtype=bool)
    mask[rng.permutation(n_tokens)[:target_count(n_tokens, ratio)]] = True
    return mask


def _draw_order(groups: RegionGroups, weighting: str, rng: np.random.Generator) -> np.ndarray:
    """Random order of groups, weighted sampling without replacement.

    Sorting ``Exp(1) / w`` keys gives the same law as drawing one group at a time with
    probability proportional to ``w`` among those left.
    """
    n_groups = len(groups.groups)
    if weighting == "uniform":
        return rng.permutation(n_groups)
    if weighting == "size":
        keys = rng.exponential(size=n_groups) / groups.sizes
        return np.argsort(keys, kind="stable")
    raise ValueError(f"unknown region weighting {weighting!r}; expected one of {WEIGHTINGS}")


def _choose_stop(before: int, after: int, target: int, n_tokens: int) -> bool:
    """``whole`` rule: whether to keep the region taking the count from ``before`` to
    ``after``."""
    if before == 0:
        return True
    if after >= n_tokens:
        return False
    return (after - target) <= (target - before)


def _compact_part(tokens: np.ndarray, need: int, positions: Optional[np.ndarray],
                  rng: np.random.Generator) -> np.ndarray:
    """``need`` of ``tokens``: those nearest a random one of them (random without
    positions)."""
    if need >= tokens.size:
        return tokens
    if positions is None:
        return rng.choice(tokens, size=need, replace=False)
    seed = positions[tokens[rng.integers(tokens.size)]]
    dist = ((positions[tokens] - seed) ** 2).sum(axis=1)
    return tokens[np.argsort(dist, kind="stable")[:need]]


def roi_mask(geometry_or_membership, ratio: float, rng: np.random.Generator,
             weighting: str = "uniform", count: str = "exact") -> np.ndarray:
    """Hide atlas regions until ``round(ratio * N)`` brain tokens are hidden.

    Parameters
    ----------
    geometry_or_membership : TokenGeometry, RegionGroups or ndarray (N,)
        Where the regions are (see :func:`region_groups`).
    ratio : float
        Target fraction of brain tokens, in (0, 1).
    rng : numpy.random.Generator
        The only source of randomness.
    weighting : {"uniform", "size"}
        Region draw probability: equal, or proportional to the region's token count.
    count : {"exact", "whole"}
        ``exact``: exactly the target, the last drawn region partly hidden; ``whole``:
        whole regions only, within one region of the target (see module notes).

    Returns
    -------
    ndarray of bool, shape (N,)
    """
    if count not in COUNT_RULES:
        raise ValueError(f"unknown ROI count rule {count!r}; expected one of {COUNT_RULES}")
    groups = region_groups(geometry_or_membership)
    n = groups.n_tokens
    target = target_count(n, ratio)
    order = _draw_order(groups, weighting, rng)
    mask = np.zeros(n, dtype=bool)
    if groups.disjoint:
        cum = np.cumsum(groups.sizes[order])
        k = min(int(np.searchsorted(cum, target)), len(order) - 1)  # first to reach target
        before = int(cum[k - 1]) if k else 0
        if k:
            mask[np.concatenate([groups.groups[i] for i in order[:k]])] = True
        last = groups.groups[order[k]]
        if count == "exact":
            mask[_compact_part(last, target - before, groups.positions, rng)] = True
        elif _choose_stop(before, int(cum[k]), target, n):
            mask[last] = True
        return mask
    hidden = 0
    for i in order:
        new = groups.groups[i][~mask[groups.groups[i]]]
        if new.size == 0:
            continue
        after = hidden + new.size
        if after < target:
            mask[new] = True
            hidden = after
            continue
        if count == "exact":
            mask[_compact_part(new, target - hidden, groups.positions, rng)] = True
        elif _choose_stop(hidden, after, target, n):
            mask[new] = True
        break
    return mask


def tube(mask_spatial: np.ndarray, n_time: int) -> np.ndarray:
    """Repeat a spatial mask over ``n_time`` time tokens.

    Parameters
    ----------
    mask_spatial : ndarray of bool, shape (N,) or (B, N)
    n_time : int

    Returns
    -------
    ndarray of bool, shape (n_time, N) or (B, n_time, N)
    """
    mask_spatial = np.asarray(mask_spatial, dtype=bool)
    return np.repeat(mask_spatial[..., None, :], n_time, axis=-2)


def make_batch_masks(strategy: str, geometry, ratio: float, batch: int, n_time: int,
                     rng: np.random.Generator, weighting: str = "uniform",
                     per_chunk: bool = False, count: str = "exact") -> np.ndarray:
    """Masks for one training batch.

    Parameters
    ----------
    strategy : {"random", "roi"}
    geometry : TokenGeometry, RegionGroups or ndarray (N,)
        Token layout (``random`` only needs ``N``).
    ratio : float
        Fraction of brain tokens hidden.
    batch, n_time : int
        ``B`` windows of ``T'`` time tokens.
    rng : numpy.random.Generator
    weighting : {"uniform", "size"}
        ROI draw weighting.
    per_chunk : bool
        Draw an independent spatial mask for every time token instead of a tube.
    count : {"exact", "whole"}
        ROI count rule (see module notes): with ``exact`` every mask hides the same
        number of tokens as ``random`` does.

    Returns
    -------
    ndarray of bool, shape (B, T', N)
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown masking strategy {strategy!r}; expected one of {STRATEGIES}")
    groups = region_groups(geometry)
    n = groups.n_tokens
    draws = batch * n_time if per_chunk else batch

    def one() -> np.ndarray:
        if strategy == "random":
            return random_mask(n, ratio, rng)
        return roi_mask(groups, ratio, rng, weighting, count)

    spatial = np.stack([one() for _ in range(draws)])
    if per_chunk:
        return spatial.reshape(batch, n_time, n)
    return tube(spatial, n_time)
