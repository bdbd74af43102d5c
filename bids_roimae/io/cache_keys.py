"""Content-hashed keys of the token cache.

A run's cache key hashes what decides its token values: the source BOLD bytes (and the
brain mask and confounds files when they are used), the geometry's extraction hash, the
preprocessing settings, the template space and the entry format. File digests are
memoised in this process and, optionally, in one small JSON per source file under
``OUTPUT_DIR/cache/.source-hashes`` so rediscovering a dataset does not re-read every
BOLD file.

The entries themselves (reading, writing, lookup) are in :mod:`bids_roimae.io.cache`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Optional

from bids_roimae.io import atomic

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1  # of a cache entry; part of every key
KEY_LENGTH = 12
HASH_INDEX_DIRNAME = ".source-hashes"
_READ_CHUNK = 8 << 20

# In-process memo of file digests: (abs path, size, mtime_ns) -> hex digest.
_DIGEST_MEMO: dict[tuple[str, int, int], str] = {}


def prep_settings(prep_cfg) -> Optional[dict]:
    """Preprocessing settings as a plain dict (``None`` stays ``None``)."""
    if prep_cfg is None:
        return None
    raw = dataclasses.asdict(prep_cfg) if dataclasses.is_dataclass(prep_cfg) else dict(prep_cfg)
    return {"confounds": raw.get("confounds", "none"),
            "target_tr": None if raw.get("target_tr") is None else float(raw["target_tr"]),
            "dtype": raw.get("dtype", "float16"),
            "normalize": raw.get("normalize", "global")}


def forget_digests() -> None:
    """Drop the in-process digest memo (only the on-disk index is then consulted)."""
    _DIGEST_MEMO.clear()


def file_digest(path, index_dir=None) -> str:
    """blake2b digest of a file's bytes, memoised by (absolute path, size, mtime_ns).

    The memo lives in this process and, when ``index_dir`` is given, in one small JSON per
    source file there, so rediscovering a dataset does not re-read every BOLD file.
    """
    path = Path(path).absolute()
    st = path.stat()
    memo_key = (str(path), st.st_size, st.st_mtime_ns)
    if memo_key in _DIGEST_MEMO:
        return _DIGEST_MEMO[memo_key]
    index_file = None
    if index_dir is not None:
        name = hashlib.blake2b(str(path).encode(), digest_size=10).hexdigest()
        index_file = Path(index_dir) / f"{name}.json"
        try:
            rec = json.loads(index_file.read_text())
            if [rec["path"], rec["size"], rec["mtime_ns"]] == list(memo_key):
                _DIGEST_MEMO[memo_key] = rec["digest"]
                return rec["digest"]
        except (OSError, ValueError, KeyError, TypeError):
            pass  # absent or stale or half-written: recompute
    h = hashlib.blake2b(digest_size=20)
    with open(path, "rb") as fh:
        while chunk := fh.read(_READ_CHUNK):
            h.update(chunk)
    digest = h.hexdigest()
    _DIGEST_MEMO[memo_key] = digest
    if index_file is not None:
        record = {"path": memo_key[0], "size": memo_key[1], "mtime_ns": memo_key[2],
                  "digest": digest}
        try:
            atomic.write_bytes(index_file, json.dumps(record).encode(), fsync=False)
        except OSError as exc:  # a read-only output only costs a re-hash next time
            logger.debug("could not record digest of %s: %s", path, exc)
    return digest


def cache_key(run, geometry, prep_cfg, template_space: str, *, index_dir=None) -> str:
    """Short hex key of everything that decides a run's token values.

    Parameters
    ----------
    run : BoldRun
        The source run (its BOLD bytes are hashed; the brain mask's too, and the confounds
        file's when confound regression is on).
    geometry : TokenGeometry
        Contributes ``extraction_hash`` (grid, affine, brain mask, patch size).
    prep_cfg : PrepConfig
        Preprocessing settings.
    template_space : str
        Template space name of the model grid.
    index_dir : path, optional
        Folder of the persistent digest memo (``cache_root(out) / ".source-hashes"``).

    Returns
    -------
    str
        ``KEY_LENGTH`` hex characters.
    """
    prep = prep_settings(prep_cfg)
    parts: dict[str, Any] = {
        "format": FORMAT_VERSION,
        "source": file_digest(run.path, index_dir),
        "mask": file_digest(run.mask_path, index_dir) if _exists(run.mask_path) else None,
        "extraction": geometry.extraction_hash,
        "prep": prep,
        "space": str(template_space),
    }
    if prep["confounds"] != "none":
        parts["confounds"] = (file_digest(run.confounds_path, index_dir)
                              if _exists(run.confounds_path) else None)
    if prep["confounds"] != "none" or prep["target_tr"] is not None:
        parts["tr"] = run.tr  # the sidecar TR changes the filter and the resampling
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.blake2b(blob, digest_size=16).hexdigest()[:KEY_LENGTH]


def _exists(path) -> bool:
    return path is not None and Path(path).is_file()
