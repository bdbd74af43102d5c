"""The brain-token cache: one memory-mapped ``.npy`` of tokens plus a JSON meta per run.

Layout (inside the output dataset, where the group job finds it)::

    OUTPUT_DIR/cache/sub-<label>/<run key>_<cache key>.npy   tokens (T, N, P), time-major
    OUTPUT_DIR/cache/sub-<label>/<run key>_<cache key>.json  meta (complete == true)
    OUTPUT_DIR/cache/.source-hashes/<hash of path>.json      memoised source digests

The cache key (:mod:`bids_roimae.io.cache_keys`) is a content hash of what
decides the token values: the source BOLD bytes (and the run's brain mask and confounds
files when they are used), the geometry's extraction hash, the preprocessing settings and
the template space. Same inputs, same key, same bytes; so concurrent writers of one entry
can only ever race to write identical files.

Atomicity (:mod:`bids_roimae.io.atomic`): both files are first written under
``.<name>.tmp-<pid>-<random>`` in the final folder and fsynced; the JSON is renamed into
place first, the ``.npy`` last. An entry is a ``.npy`` whose JSON exists and is complete,
so a reader never sees tokens without their meta, and a killed writer leaves only
``.tmp-*`` files, which no reader looks at.
"""

from __future__ import annotations

import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from bids_roimae.io import atomic
from bids_roimae.io.cache_keys import FORMAT_VERSION, HASH_INDEX_DIRNAME, cache_key, prep_settings

logger = logging.getLogger(__name__)


class ScaledTokens:
    """Read-only float32 view of an int8 token array: ``int8 * scale`` on every read.

    Slicing returns a float32 ndarray, so ``tokens[t0:t0 + W]`` reads (and scales) only
    that window from the memory map.
    """

    def __init__(self, raw: np.ndarray, scale: float):
        self.raw = raw
        self.scale = np.float32(scale)

    shape = property(lambda self: self.raw.shape)
    ndim = property(lambda self: self.raw.ndim)
    dtype = property(lambda self: np.dtype(np.float32))

    def __len__(self) -> int:
        return len(self.raw)

    def __getitem__(self, item) -> np.ndarray:
        return np.multiply(self.raw[item], self.scale, dtype=np.float32)

    def __array__(self, dtype=None, copy=None):
        out = self[...]
        return out if dtype is None else out.astype(dtype, copy=False)


@dataclass
class CacheEntry:
    """One prepared run in the cache.

    Attributes
    ----------
    path : Path
        The ``.npy`` token file, shape (T, N, P).
    meta : dict
        The JSON written beside it (run entities, TRs, settings, counts).
    """

    path: Path
    meta: dict

    subject = property(lambda self: self.meta["subject"])
    session = property(lambda self: self.meta.get("session"))
    task = property(lambda self: self.meta.get("task"))
    run = property(lambda self: self.meta.get("run"))
    run_key = property(lambda self: self.meta["run_key"])
    n_frames = property(lambda self: int(self.meta["shape"][0]))
    tr = property(lambda self: self.meta.get("tr"))
    source = property(lambda self: self.meta.get("source"))
    key = property(lambda self: self.meta["key"])
    scale = property(lambda self: self.meta.get("scale"))

    def tokens(self, mmap: bool = True):
        """The run's tokens, shape (T, N, P).

        Parameters
        ----------
        mmap : bool
            Memory-map the file (default) instead of reading it into memory.

        Returns
        -------
        ndarray or ScaledTokens
            float16 (T, N, P) for float16 entries; for int8 entries a
            :class:`ScaledTokens` whose slices are float32 values scaled back.
        """
        raw = np.load(self.path, mmap_mode="r" if mmap else None, allow_pickle=False)
        if raw.dtype == np.int8:
            return ScaledTokens(raw, self.meta["scale"])
        return raw

    def window(self, start: int, length: int, out: Optional[np.ndarray] = None,
               tokens=None) -> np.ndarray:
        """Frames ``start:start + length`` as float32, shape (length, N, P).

        ``out`` (float32, C-contiguous, same shape) is filled in place when given, which
        avoids an allocation per window in a loader; ``tokens`` is this entry's
        :meth:`tokens` already opened, so a loader reading many windows of one run maps
        the file once.
        """
        if start < 0 or start + length > self.n_frames:
            raise IndexError(f"window {start}:{start + length} outside 0:{self.n_frames}")
        block = (self.tokens() if tokens is None else tokens)[start:start + length]
        if out is None:
            out = np.empty(block.shape, np.float32)
        if block.dtype == np.float16:
            half_to_float(block, out)
        else:
            np.copyto(out, block, casting="unsafe")
        return out


def half_to_float(src: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Copy float16 ``src`` into float32 ``out`` (same shape, C-contiguous).

    numpy converts half floats element by element; torch's vectorised copy is several
    times faster.
    """
    with warnings.catch_warnings():  # memory maps are read-only; torch only reads them
        warnings.simplefilter("ignore", UserWarning)
        torch.from_numpy(out).copy_(torch.from_numpy(np.ascontiguousarray(src)))
    return out


def cache_root(output_dir) -> Path:
    """Folder of the token cache inside the output dataset: ``OUTPUT_DIR/cache``."""
    return Path(output_dir) / "cache"


def entry_path(output_dir, run, key: str) -> Path:
    """``cache/sub-<label>/<run.key>_<key>.npy``."""
    return cache_root(output_dir) / f"sub-{run.subject}" / f"{run.key}_{key}.npy"


def meta_path(npy_path) -> Path:
    """The JSON beside a token file."""
    return Path(npy_path).with_suffix(".json")


def read_entry(npy_path) -> Optional[CacheEntry]:
    """The entry at ``npy_path``, or ``None`` if its tokens or complete meta are missing."""
    npy_path = Path(npy_path)
    if atomic.TMP_MARK in npy_path.name or not npy_path.is_file():
        return None
    try:
        meta = json.loads(meta_path(npy_path).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or not meta.get("complete") \
            or meta.get("format") != FORMAT_VERSION:
        return None
    return CacheEntry(npy_path, meta)


def lookup(output_dir, run, geometry, prep_cfg, space: str) -> Optional[CacheEntry]:
    """The cached entry for ``run`` under these settings, or ``None`` when it must be made."""
    key = cache_key(run, geometry, prep_cfg, space,
                    index_dir=cache_root(output_dir) / HASH_INDEX_DIRNAME)
    return cached_entry(output_dir, run, key)


def cached_entry(output_dir, run, key: str) -> Optional[CacheEntry]:
    """The complete entry of ``run`` under cache ``key`` (its meta and ``.npy`` header
    agree), or ``None``."""
    entry = read_entry(entry_path(output_dir, run, key))
    if entry is None or entry.meta.get("key") != key or not _header_matches(entry):
        return None
    return entry


def load_entries(output_dir, geometry, prep_cfg=None, subjects=None) -> list[CacheEntry]:
    """Every cached entry made for this geometry (and these prep settings, if given).

    Parameters
    ----------
    output_dir : path
        The output dataset holding ``cache/``.
    geometry : TokenGeometry
        Entries whose ``extraction_hash`` differs are left out.
    prep_cfg : PrepConfig, optional
        When given, only entries prepared with these settings.
    subjects : iterable of str, optional
        Participant labels, with or without ``sub-``.

    Returns
    -------
    list of CacheEntry
        Sorted by path. When a run was prepared more than once with the same settings
        (its source file changed), only the newest entry is kept.
    """
    root = cache_root(output_dir)
    if subjects is not None:
        folders = [root / f"sub-{str(s).removeprefix('sub-')}" for s in subjects]
    else:
        folders = sorted(root.glob("sub-*"))
    wanted_prep = prep_settings(prep_cfg)
    newest: dict[tuple, tuple[int, CacheEntry]] = {}
    for folder in folders:
        for npy in sorted(folder.glob("*.npy")):
            entry = read_entry(npy)
            if entry is None or entry.meta.get("extraction_hash") != geometry.extraction_hash:
                continue
            if wanted_prep is not None and entry.meta.get("prep") != wanted_prep:
                continue
            ident = (entry.run_key, entry.meta.get("space"),
                     json.dumps(entry.meta.get("prep"), sort_keys=True))
            mtime = npy.stat().st_mtime_ns
            if ident in newest:
                logger.info("cache holds an older preparation of %s; using the newest",
                            entry.run_key)
                if newest[ident][0] >= mtime:
                    continue
            newest[ident] = (mtime, entry)
    return sorted((e for _, e in newest.values()), key=lambda e: str(e.path))


def write_entry(npy_path, shape: tuple, dtype, fill: Callable[[np.ndarray], None],
                meta: dict) -> CacheEntry:
    """Write one entry atomically (see the module docstring for the protocol).

    Parameters
    ----------
    npy_path : Path
        Final ``.npy`` path; its folder is created.
    shape, dtype
        Token array shape (T, N, P) and type.
    fill : callable
        Called with the writable memory map (all zeros) to store the tokens.
    meta : dict
        JSON-serialisable meta; ``complete``, ``format`` and ``shape`` are set here.
    """
    npy_path = Path(npy_path)
    meta = dict(meta, shape=[int(s) for s in shape], dtype=np.dtype(dtype).name,
                format=FORMAT_VERSION, complete=True)

    def write_tokens_then_meta(tmp_npy: Path) -> None:
        arr = np.lib.format.open_memmap(tmp_npy, mode="w+", dtype=dtype, shape=tuple(shape))
        # open_memmap leaves a sparse file: reserve its blocks before filling the map, so
        # a full disk is ENOSPC here and not a SIGBUS while the pages are written.
        atomic.preallocate(tmp_npy, tmp_npy.stat().st_size)
        fill(arr)
        arr.flush()
        del arr
        atomic.fsync_file(tmp_npy)
        # the meta goes into place before the tokens: a visible .npy always has its meta
        atomic.write_bytes(meta_path(npy_path),
                           json.dumps(meta, indent=1, sort_keys=True, default=str).encode(),
                           mkdir=False)

    atomic.write_via(npy_path, write_tokens_then_meta, fsync=False)
    atomic.fsync_dir(npy_path.parent)
    return CacheEntry(npy_path, meta)


def brain_voxels(geometry) -> tuple[np.ndarray, np.ndarray]:
    """Where the template-brain token voxels are on the grid and in a token frame.

    Returns
    -------
    grid_index : ndarray, shape (V,)
        Fortran-order flat grid index of each brain token voxel, ascending (the column
        order of the (T, V) matrices that preparation works on).
    token_source : ndarray, shape (N * P,)
        For every slot of a flattened (N, P) token frame, the column of ``grid_index``
        it holds, or ``V`` for slots outside the brain.
    """
    slots = np.flatnonzero(geometry.voxel_mask.reshape(-1))
    flat = geometry.voxel_index.reshape(-1)[slots]
    order = np.argsort(flat, kind="stable")
    token_source = np.full(geometry.voxel_mask.size, flat.size, np.int64)
    token_source[slots[order]] = np.arange(flat.size)
    return flat[order], token_source


def write_tokens(npy_path, brain: np.ndarray, geometry, dtype: str, meta: dict) -> CacheEntry:
    """Store brain voxel values as a token entry, atomically.

    Parameters
    ----------
    brain : ndarray, shape (T, V)
        Values of the template-brain voxels, columns in :func:`brain_voxels` order.
    dtype : {"float16", "int8"}
        Storage type; int8 stores ``round(value / scale)`` with ``scale = max|value| / 127``
        recorded in the meta.
    """
    n_frames, n_vox = brain.shape
    _, token_source = brain_voxels(geometry)
    scale = None
    if dtype == "int8":
        peak = float(np.abs(brain).max()) if brain.size else 0.0
        scale = peak / 127.0 if peak > 0 else 1.0
        meta = dict(meta, scale=scale)

    def fill(arr: np.ndarray) -> None:
        # Each token slot gathers its column (column V is a constant 0 outside the brain):
        # reads one small frame, writes the output in order.
        padded = np.zeros(n_vox + 1, arr.dtype)
        rows = arr.reshape(n_frames, -1)
        for t in range(n_frames):
            if scale is None:
                padded[:n_vox] = brain[t]
            else:
                padded[:n_vox] = np.clip(np.rint(brain[t] * np.float32(1 / scale)), -127, 127)
            np.take(padded, token_source, out=rows[t])

    shape = (n_frames, geometry.n_tokens, geometry.patch_voxels)
    return write_entry(npy_path, shape, np.dtype(dtype), fill, meta)


def remove_stale_temps(folder, max_age_s: float = 86400.0) -> int:
    """Delete temporary files left by killed writers in a cache folder.

    Those of a writer of this host whose process is gone go at once, whatever their age
    (a full disk stays full otherwise); those of other hosts after ``max_age_s``.
    """
    return atomic.remove_dead_temps(folder, max_age_s)


# -- helpers ---------------------------------------------------------------------------
def _header_matches(entry: CacheEntry) -> bool:
    """The ``.npy`` header agrees with the meta (guards against a foreign file)."""
    try:
        with open(entry.path, "rb") as fh:
            version = np.lib.format.read_magic(fh)
            reader = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                      else np.lib.format.read_array_header_2_0)
            shape, _, dtype = reader(fh)
    except (OSError, ValueError):
        return False
    return list(shape) == entry.meta.get("shape") and dtype.name == entry.meta.get("dtype")
