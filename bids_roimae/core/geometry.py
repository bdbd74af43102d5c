"""Brain-token geometry: which voxels of the model grid each token holds, and their regions.

The brain mask's bounding box is tiled by cubes of ``patch_size`` voxels; only patches that
touch the brain make tokens (background is never computed on). How patches become tokens
and tokens regions is the geometry's ``rule``:

``exact`` (default)
    **region-split tokens**: a patch that holds several atlas regions gives one token per
    region piece (patch ∩ region), so every token lies in exactly one region and a region
    is exactly its own voxels (masking, fidelity and region tables are voxel-exact, and
    every region present in the brain owns tokens, however small). Unlabelled brain
    voxels of a mixed patch join the piece of their nearest labelled voxel in the patch
    (they belong to no region, and a token of a few stray voxels would be wasted work);
    a patch with no labelled voxel is one unlabelled token. Tokens of one patch share
    its ``voxel_index``; their ``voxel_mask`` rows are disjoint and cover the patch's brain.
``majority``
    one token per patch, owned by the most frequent label among its labelled brain
    voxels (checkpoints written before ``exact`` existed use it);
``any``
    one token per patch, in every region with at least one voxel in the patch;
``pure``
    one token per patch, in a region only when all its labelled brain voxels carry it.

Measured on MNI152NLin2009cAsym 2 mm with AAL3v1 (166 regions in the brain): at patch
edge 4 / 6 / 8 voxels ``exact`` makes 8,226 / 3,726 / 2,325 tokens from 4,474 / 1,486 / 689
patches and every one of the 166 regions can be masked, against 152 / 138 / 119 regions
owning a patch under ``majority``.

The geometry is derived once from (grid, brain mask, atlas, patch size) and saved inside
every checkpoint (:meth:`TokenGeometry.to_arrays`), so later stages reuse the same table.

Shapes: ``N`` spatial tokens, ``P = patch_size**3`` voxels per patch, ``T`` frames.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

RULES = ("exact", "majority", "any", "pure")


@dataclass(frozen=True)
class TokenGeometry:
    """Spatial token layout on a model grid.

    Attributes
    ----------
    grid_shape : tuple of int
        ``(X, Y, Z)`` of the model grid.
    affine : ndarray, shape (4, 4)
        Voxel-to-mm affine of the model grid.
    patch_size : int
        Patch edge in voxels.
    origin : ndarray, shape (3,)
        Voxel index where the tiling starts (the brain bounding box's corner).
    patch_ijk : ndarray, shape (N, 3)
        Index of each token's patch in the tiling (C order over the tiling; with the
        ``exact`` rule the pieces of one patch repeat its row, in label order).
    voxel_index : ndarray, shape (N, P)
        Flat (Fortran order) grid index of every voxel of each token's patch; ``-1``
        outside the grid.
    voxel_mask : ndarray of bool, shape (N, P)
        The token's own brain voxels (the loss and maps only ever use these).
    labels : ndarray, shape (N, P)
        Atlas label of each of the token's voxels (0 = unlabelled or not the token's).
    rule : str
        How patches become tokens and tokens regions (see module docstring).
    region_ids : ndarray, shape (R,)
        Atlas labels present in the brain on this grid, ascending.
    member_patch, member_region : ndarray, shape (M,)
        Token-to-region membership pairs under ``rule`` (``member_patch`` holds token
        indices, ``member_region`` labels).
    """

    grid_shape: tuple
    affine: np.ndarray
    patch_size: int
    origin: np.ndarray
    patch_ijk: np.ndarray
    voxel_index: np.ndarray
    voxel_mask: np.ndarray
    labels: np.ndarray
    rule: str
    region_ids: np.ndarray
    member_patch: np.ndarray
    member_region: np.ndarray
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    # -- sizes -----------------------------------------------------------------------
    @property
    def n_tokens(self) -> int:
        """Number of spatial tokens ``N``."""
        return int(self.patch_ijk.shape[0])

    @property
    def patch_voxels(self) -> int:
        """Voxels per patch ``P``."""
        return int(self.patch_size ** 3)

    @property
    def brain_fraction(self) -> np.ndarray:
        """Share of brain voxels in each patch, shape (N,)."""
        return self.voxel_mask.mean(axis=1)

    @property
    def n_patches(self) -> int:
        """Number of distinct patches the tokens come from."""
        return int(np.unique(self.patch_ijk, axis=0).shape[0]) if self.n_tokens else 0

    @property
    def centres_mm(self) -> np.ndarray:
        """Token positions in mm (world coordinates), shape (N, 3).

        Patch centres for the one-token-per-patch rules (as checkpoints written with them
        expect); the centroid of the token's own brain voxels for ``exact``, so the pieces
        of one patch get distinct positions.
        """
        if "centres_mm" not in self._cache:
            p = self.patch_size
            if self.rule == "exact":
                vox = (self.origin + self.patch_ijk[:, None, :] * p
                       + _patch_offsets(p)[None, :, :]).astype(np.float64)
                weight = self.voxel_mask.astype(np.float64)
                centre_vox = ((vox * weight[..., None]).sum(1)
                              / np.maximum(weight.sum(1), 1.0)[:, None])
            else:
                centre_vox = self.origin + self.patch_ijk * p + (p - 1) / 2
            self._cache["centres_mm"] = centre_vox @ self.affine[:3, :3].T + self.affine[:3, 3]
        return self._cache["centres_mm"]

    @property
    def patch_label(self) -> np.ndarray:
        """One region label per token (majority of its labelled brain voxels, the only one
        with the ``exact`` rule; 0 if none), shape (N,)."""
        if "patch_label" not in self._cache:
            self._cache["patch_label"] = _majority(self.labels, self.voxel_mask)
        return self._cache["patch_label"]

    def region_patches(self) -> dict[int, np.ndarray]:
        """Map each region label to the token indices it owns under ``rule``.

        With ``exact`` these tokens hold exactly the region's voxels (plus unlabelled ones).
        """
        if "region_patches" not in self._cache:
            order = np.argsort(self.member_region, kind="stable")
            regions, starts = np.unique(self.member_region[order], return_index=True)
            groups = np.split(self.member_patch[order], starts[1:])
            self._cache["region_patches"] = {int(r): g for r, g in zip(regions, groups)}
        return self._cache["region_patches"]

    def owning_regions(self) -> np.ndarray:
        """Labels of regions that own at least one token under ``rule`` (the regions that
        masking and fidelity can hide; all of ``region_ids`` with ``exact``)."""
        return np.array(sorted(self.region_patches()), dtype=np.int64)

    # -- data movement ---------------------------------------------------------------
    def extract(self, data: np.ndarray, dtype=np.float32) -> np.ndarray:
        """Cut a 3D or 4D grid array into tokens.

        Parameters
        ----------
        data : ndarray, shape (X, Y, Z) or (X, Y, Z, T)
            Values on the model grid.
        dtype : numpy dtype
            Output type.

        Returns
        -------
        ndarray, shape (N, P) for 3D input or (T, N, P) for 4D input
            Non-brain voxels are 0.
        """
        if tuple(data.shape[:3]) != tuple(self.grid_shape):
            raise ValueError(f"data grid {data.shape[:3]} != model grid {self.grid_shape}")
        idx = np.where(self.voxel_index >= 0, self.voxel_index, 0)
        if data.ndim == 3:
            flat = np.asarray(data).reshape(-1, order="F")
            out = flat[idx].astype(dtype, copy=False)
            return np.where(self.voxel_mask, out, 0).astype(dtype, copy=False)
        n_frames = data.shape[3]
        out = np.empty((n_frames, self.n_tokens, self.patch_voxels), dtype=dtype)
        sel = idx.reshape(-1)
        keep = self.voxel_mask
        for t in range(n_frames):
            frame = np.asarray(data[..., t]).reshape(-1, order="F")
            np.multiply(frame[sel].reshape(keep.shape), keep, out=out[t], casting="unsafe")
        return out

    def scatter(self, values: np.ndarray, fill: float = 0.0) -> np.ndarray:
        """Paint per-token (N,) or per-voxel (N, P) values back onto the 3D grid.

        Only brain voxels are written; everything else is ``fill``.
        """
        values = np.asarray(values)
        if values.shape == (self.n_tokens,):
            values = np.broadcast_to(values[:, None], self.voxel_mask.shape)
        if values.shape != self.voxel_mask.shape:
            raise ValueError(f"values shape {values.shape} is neither (N,) nor (N, P)")
        out = np.full(int(np.prod(self.grid_shape)), fill, dtype=np.float32)
        sel = self.voxel_mask & (self.voxel_index >= 0)
        out[self.voxel_index[sel]] = values[sel]
        return out.reshape(self.grid_shape, order="F")

    # -- identity and persistence ----------------------------------------------------
    @property
    def extraction_hash(self) -> str:
        """Hash of what decides token values (grid, affine, brain mask, patch size, and
        with the ``exact`` rule how patches split into region pieces).

        With the one-token-per-patch rules atlas labels do not change token values, so a
        cache keyed by this survives an atlas switch; with ``exact`` the split follows the
        atlas, so another atlas needs its own cache.
        """
        if "extraction_hash" not in self._cache:
            h = hashlib.sha256()
            h.update(np.asarray(self.grid_shape, np.int64).tobytes())
            h.update(np.round(np.asarray(self.affine, np.float64), 4).tobytes())
            h.update(np.int64(self.patch_size).tobytes())
            h.update(np.ascontiguousarray(self.voxel_index, np.int64).tobytes())
            h.update(np.packbits(self.voxel_mask).tobytes())
            self._cache["extraction_hash"] = h.hexdigest()
        return self._cache["extraction_hash"]

    @property
    def atlas_hash(self) -> str:
        """Hash of the per-voxel atlas labels and the assignment rule."""
        if "atlas_hash" not in self._cache:
            h = hashlib.sha256(self.rule.encode())
            h.update(np.ascontiguousarray(self.labels, np.int32).tobytes())
            self._cache["atlas_hash"] = h.hexdigest()
        return self._cache["atlas_hash"]

    def to_arrays(self) -> dict:
        """Plain numpy arrays and scalars that :meth:`from_arrays` rebuilds from."""
        return {
            "grid_shape": np.asarray(self.grid_shape, np.int64),
            "affine": np.asarray(self.affine, np.float64),
            "patch_size": int(self.patch_size),
            "origin": np.asarray(self.origin, np.int64),
            "patch_ijk": np.asarray(self.patch_ijk, np.int64),
            "voxel_mask": np.asarray(self.voxel_mask, bool),
            "labels": np.asarray(self.labels, np.int32),
            "rule": self.rule,
        }

    @classmethod
    def from_arrays(cls, arrays: dict) -> "TokenGeometry":
        """Rebuild a geometry saved with :meth:`to_arrays`."""
        grid = tuple(int(v) for v in np.asarray(arrays["grid_shape"]))
        p = int(arrays["patch_size"])
        origin = np.asarray(arrays["origin"], np.int64)
        ijk = np.asarray(arrays["patch_ijk"], np.int64)
        return _assemble(grid, np.asarray(arrays["affine"], np.float64), p, origin, ijk,
                         np.asarray(arrays["voxel_mask"], bool),
                         np.asarray(arrays["labels"], np.int32), str(arrays["rule"]))

    def summary(self) -> dict:
        """Facts worth logging: token and patch counts, box, regions owning tokens."""
        return {
            "grid_shape": list(self.grid_shape),
            "patch_size": self.patch_size,
            "tiling": [int(v) for v in self.patch_ijk.max(axis=0) + 1] if self.n_tokens else [],
            "n_tokens": self.n_tokens,
            "n_patches": self.n_patches,
            "rule": self.rule,
            "n_regions_in_brain": int(self.region_ids.size),
            "n_regions_owning_patches": int(self.owning_regions().size),
        }


def _patch_offsets(p: int) -> np.ndarray:
    """Voxel offsets inside one patch, shape (P, 3), C order."""
    r = np.arange(p)
    return np.stack(np.meshgrid(r, r, r, indexing="ij"), axis=-1).reshape(-1, 3)


def _majority(labels: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Most frequent positive label per row among masked entries (ties: smallest label)."""
    out = np.zeros(labels.shape[0], dtype=np.int64)
    lab = np.where(mask, labels, 0)
    for i, row in enumerate(lab):
        row = row[row > 0]
        if row.size:
            vals, counts = np.unique(row, return_counts=True)
            out[i] = vals[np.argmax(counts)]
    return out


def _memberships(labels: np.ndarray, mask: np.ndarray, rule: str
                 ) -> tuple[np.ndarray, np.ndarray]:
    if rule in ("majority", "exact"):  # an exact token has one label: its majority
        maj = _majority(labels, mask)
        keep = np.flatnonzero(maj > 0)
        return keep, maj[keep]
    lab = np.where(mask, labels, 0)
    pairs = set()
    for i, row in enumerate(lab):
        present = np.unique(row[row > 0])
        if rule == "any":
            pairs.update((i, int(v)) for v in present)
        elif rule == "pure" and present.size == 1:
            pairs.add((i, int(present[0])))
    if not pairs:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    arr = np.array(sorted(pairs), dtype=np.int64)
    return arr[:, 0], arr[:, 1]


def _assemble(grid, affine, p, origin, ijk, voxel_mask, labels, rule) -> TokenGeometry:
    if rule not in RULES:
        raise ValueError(f"unknown region rule {rule!r}; expected one of {RULES}")
    offs = _patch_offsets(p)
    vox = origin[None, None, :] + ijk[:, None, :] * p + offs[None, :, :]  # (N, P, 3)
    inside = np.all((vox >= 0) & (vox < np.asarray(grid)[None, None, :]), axis=-1)
    flat = vox[..., 0] + grid[0] * (vox[..., 1] + grid[1] * vox[..., 2])
    voxel_index = np.where(inside, flat, -1).astype(np.int64)
    member_patch, member_region = _memberships(labels, voxel_mask, rule)
    present = np.unique(labels[voxel_mask & (labels > 0)])
    return TokenGeometry(
        grid_shape=tuple(int(g) for g in grid), affine=np.asarray(affine, np.float64),
        patch_size=int(p), origin=np.asarray(origin, np.int64), patch_ijk=ijk,
        voxel_index=voxel_index, voxel_mask=voxel_mask, labels=labels.astype(np.int32),
        rule=rule, region_ids=present.astype(np.int64),
        member_patch=member_patch, member_region=member_region,
    )


def build_geometry(brain_mask: np.ndarray, affine: np.ndarray,
                   labels: Optional[np.ndarray] = None, patch_size: int = 6,
                   rule: str = "exact", min_brain_fraction: float = 0.0
                   ) -> TokenGeometry:
    """Tile the brain mask's bounding box and keep the patches that touch the brain.

    Parameters
    ----------
    brain_mask : ndarray of bool, shape (X, Y, Z)
        Template brain mask on the model grid.
    affine : ndarray, shape (4, 4)
        The model grid's affine.
    labels : ndarray of int, shape (X, Y, Z), optional
        Atlas labels already on the model grid (0 = background). Without it every patch
        is unlabelled.
    patch_size : int
        Patch edge in voxels.
    rule : {"exact", "majority", "any", "pure"}
        How patches become tokens and tokens regions (see module docstring).
    min_brain_fraction : float
        Drop patches whose share of brain voxels is below this (0 keeps all touching).

    Returns
    -------
    TokenGeometry
    """
    mask = np.asarray(brain_mask) > 0
    if mask.ndim != 3:
        raise ValueError(f"brain mask must be 3D, got shape {mask.shape}")
    if not mask.any():
        raise ValueError("brain mask is empty")
    if labels is None:
        labels = np.zeros(mask.shape, np.int32)
    labels = np.asarray(labels)
    if labels.shape != mask.shape:
        raise ValueError(f"atlas grid {labels.shape} != brain mask grid {mask.shape}")
    p = int(patch_size)
    nz = np.argwhere(mask)
    lo, hi = nz.min(axis=0), nz.max(axis=0) + 1
    n_tiles = -(-(hi - lo) // p)
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in n_tiles], indexing="ij"),
                   axis=-1).reshape(-1, 3)
    # Pad so every tile is a full cube, then count brain voxels per tile in one pass.
    padded = np.zeros(tuple(n_tiles * p), bool)
    sl = tuple(slice(0, min(high, mask.shape[a]) - low)
               for a, (low, high) in enumerate(zip(lo, lo + n_tiles * p)))
    padded[sl] = mask[tuple(slice(low, low + s.stop) for low, s in zip(lo, sl))]
    counts = padded.reshape(n_tiles[0], p, n_tiles[1], p, n_tiles[2], p).sum(axis=(1, 3, 5))
    frac = counts.reshape(-1) / p ** 3
    keep = (frac > 0) & (frac >= min_brain_fraction)
    ijk = ijk[keep]
    offs = _patch_offsets(p)
    vox = lo[None, None, :] + ijk[:, None, :] * p + offs[None, :, :]
    inside = np.all((vox >= 0) & (vox < np.asarray(mask.shape)[None, None, :]), axis=-1)
    vc = np.where(inside[..., None], vox, 0)
    vmask = mask[vc[..., 0], vc[..., 1], vc[..., 2]] & inside
    vlab = np.where(vmask, labels[vc[..., 0], vc[..., 1], vc[..., 2]], 0).astype(np.int32)
    if rule == "exact":
        ijk, vmask, vlab = split_regions(ijk, vmask, vlab, p)
    return _assemble(mask.shape, affine, p, lo.astype(np.int64), ijk, vmask, vlab, rule)


def split_regions(patch_ijk: np.ndarray, voxel_mask: np.ndarray, labels: np.ndarray,
                  patch_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split patches holding several atlas regions into one token per region piece.

    Parameters
    ----------
    patch_ijk : ndarray, shape (M, 3)
    voxel_mask : ndarray of bool, shape (M, P)
    labels : ndarray of int, shape (M, P)
        One row per patch.
    patch_size : int

    Returns
    -------
    patch_ijk, voxel_mask, labels : ndarrays with one row per token
        Pieces of a patch follow each other in ascending label order; a patch with at most
        one region stays one token. Unlabelled brain voxels of a mixed patch go to the
        piece of their nearest labelled voxel (ties: the first in the patch's C order).
    """
    offsets = _patch_offsets(patch_size)
    lab = np.where(voxel_mask, labels, 0)
    n_labels = np.array([np.unique(row[row > 0]).size for row in lab])
    rows = []
    for q in range(patch_ijk.shape[0]):
        if n_labels[q] <= 1:
            rows.append((q, voxel_mask[q], lab[q]))
            continue
        owner = lab[q].copy()
        loose = voxel_mask[q] & (owner == 0)
        if loose.any():
            labelled = np.flatnonzero(owner > 0)
            dist = ((offsets[loose][:, None, :] - offsets[labelled][None, :, :]) ** 2).sum(-1)
            owner[loose] = owner[labelled[np.argmin(dist, axis=1)]]
        for region in np.unique(owner[owner > 0]):
            piece = voxel_mask[q] & (owner == region)
            rows.append((q, piece, np.where(piece, lab[q], 0)))
    index = np.array([q for q, _, _ in rows], np.int64)
    return (patch_ijk[index], np.stack([m for _, m, _ in rows]),
            np.stack([v for _, _, v in rows]).astype(np.int32))


def window_tokens(tokens: np.ndarray, temporal_patch: int) -> np.ndarray:
    """Group a window's frames into temporal patches.

    Parameters
    ----------
    tokens : ndarray, shape (..., W, N, P)
    temporal_patch : int
        Frames per token; must divide ``W``.

    Returns
    -------
    ndarray, shape (..., W // temporal_patch, N, temporal_patch * P)
        Feature order is (frame-in-patch, voxel).
    """
    *lead, w, n, p = tokens.shape
    if w % temporal_patch:
        raise ValueError(f"window {w} is not a multiple of temporal patch {temporal_patch}")
    t = tokens.reshape(*lead, w // temporal_patch, temporal_patch, n, p)
    t = np.moveaxis(t, -2, -3)
    return t.reshape(*lead, w // temporal_patch, n, temporal_patch * p)


def describe_regions(geometry: TokenGeometry, names: Optional[Sequence[str]] = None,
                     ids: Optional[Sequence[int]] = None) -> str:
    """One line for logs: tokens, patches, and how many atlas regions can be masked.

    DESIGN.md asks for this number for every geometry and atlas: it is the region
    fidelity that a coarser patch (or a patch-level rule) trades for speed.
    """
    total = len(ids) if ids is not None else geometry.region_ids.size
    p = geometry.patch_size
    tokens = (f"{geometry.n_tokens} tokens (region pieces of {geometry.n_patches} brain "
              f"patches of {p}^3 voxels)" if geometry.rule == "exact"
              else f"{geometry.n_tokens} brain patches of {p}^3 voxels")
    return (f"{tokens}; {geometry.owning_regions().size} of {total} atlas regions can be "
            f"masked ({geometry.rule} rule)")
