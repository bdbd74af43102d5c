"""The pybids layout over an fMRIPrep folder, its saved index database and BOLD queries.

The folder is indexed without metadata (large datasets must not be crawled for JSON) and
folders that hold no preprocessed BOLD are skipped. With ``database_dir`` the pybids index
is kept in SQLite and reused by later calls while the top-level listing of the derivatives
folder is unchanged (a new or removed subject rebuilds it). The index is built in a private
folder and renamed into place, so participant jobs started together never read a
half-written index.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import uuid
from pathlib import Path

from bids_roimae.errors import NoDataSelected

log = logging.getLogger(__name__)

# fMRIPrep folders that hold no BOLD series; skipping them keeps indexing fast
_IGNORE = (
    re.compile(r"^/(code|models|sourcedata|stimuli|logs|log|figures)(/|$)"),
    re.compile(r"^/sub-[^/]+/(ses-[^/]+/)?(anat|fmap|dwi|perf|figures|log|xfm)(/|$)"),
    # only preprocessed BOLD is queried; companions and sidecars are found by name
    re.compile(r"^/sub-[^/]+/(ses-[^/]+/)?func/(?![^/]*_desc-preproc_bold\.nii(\.gz)?$)[^/]+$"),
    re.compile(r"^/[^/]+\.html$"),
)
_INDEX_VERSION = "2"  # bump when _IGNORE or the layout config change


def _as_query(value):
    from bids.layout import Query

    def one(v):
        return Query.NONE if v is None else Query.ANY if v == "*" else v

    return [one(v) for v in value] if isinstance(value, list) else one(value)


def _root_fingerprint(root: Path) -> str:
    """Changes when a subject folder is added or removed (one listdir, no crawl)."""
    listing = "\n".join(sorted(os.listdir(root)))
    return hashlib.sha1(f"{_INDEX_VERSION}\n{listing}".encode()).hexdigest()


def open_layout(root: Path, database_dir):
    """pybids layout over ``root`` without metadata, reusing a saved index when valid.

    Parameters
    ----------
    root : pathlib.Path
        The fMRIPrep folder.
    database_dir : path, optional
        Where the SQLite index is saved and reused; ``None`` indexes in memory (as does
        an unwritable folder, with a warning).

    Returns
    -------
    bids.BIDSLayout
        Layout with the ``bids`` and ``derivatives`` configurations.
    """
    from bids import BIDSLayout
    from bids.layout import BIDSLayoutIndexer

    def build(database_path):
        indexer = BIDSLayoutIndexer(validate=False, index_metadata=False, ignore=list(_IGNORE))
        return BIDSLayout(root, validate=False, config=["bids", "derivatives"],
                          indexer=indexer, database_path=database_path,
                          reset_database=database_path is not None)

    if database_dir is None:
        return build(None)
    database_dir = Path(database_dir).absolute()
    final = database_dir / f"fmriprep-{hashlib.sha1(str(root).encode()).hexdigest()[:12]}"
    fingerprint = _root_fingerprint(root)
    stamp = final / "fingerprint.txt"
    if (final / "layout_index.sqlite").is_file() and stamp.is_file() \
            and stamp.read_text() == fingerprint:
        return BIDSLayout(root, validate=False, database_path=final)
    try:
        database_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        log.warning("cannot save the BIDS index in %s (%s); indexing in memory", database_dir, err)
        return build(None)
    # index privately, then rename into place: concurrent jobs never see a partial index
    private = database_dir / f".{final.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
    try:
        layout = build(private)
        del layout  # its SQLite connections refer to the private path
        (private / "fingerprint.txt").write_text(fingerprint)
        if final.exists():
            stale = database_dir / f".{final.name}.stale.{uuid.uuid4().hex[:8]}"
            try:
                final.rename(stale)
                shutil.rmtree(stale, ignore_errors=True)
            except OSError:
                pass  # another job replaced it first
        try:
            private.rename(final)
        except OSError:
            pass  # another job renamed its (equivalent) index first
    finally:
        shutil.rmtree(private, ignore_errors=True)
    return BIDSLayout(root, validate=False, database_path=final)


def layout_query(subjects, sessions, tasks, filters) -> dict:
    """The pybids query for preprocessed BOLD of the selected labels and filters.

    Parameters
    ----------
    subjects, sessions, tasks : list of str
        Labels without prefix; empty selects all.
    filters : dict
        Checked ``bold`` entry of a filter file (pybids entity names); ``null`` and
        ``"*"`` become ``Query.NONE`` / ``Query.ANY``. Subject, session and task values
        intersect the labels.

    Returns
    -------
    dict
        Keyword arguments for ``BIDSLayout.get``.

    Raises
    ------
    NoDataSelected
        Labels and filters select nothing together.
    """
    query = {"datatype": "func", "suffix": "bold", "desc": "preproc",
             "extension": [".nii.gz", ".nii"]}
    for name, labels in (("subject", subjects), ("session", sessions), ("task", tasks)):
        if labels:
            query[name] = labels
    for name, value in filters.items():
        if name in query and name in ("subject", "session", "task"):
            wanted = [str(v) for v in (value if isinstance(value, list) else [value])
                      if v is not None and v != "*"]
            query[name] = [v for v in query[name] if v in wanted]
            if not query[name]:
                raise NoDataSelected(f"the {name} labels and the BIDS filter file "
                                     f"select nothing together")
        else:
            query[name] = _as_query(value)
    return query
