"""The files found beside a preprocessed BOLD run.

For one run: its RepetitionTime, read from JSON sidecars by the BIDS inheritance principle
over the derivatives folder and, when it is a separate dataset, the raw BIDS folder; and
its companion brain mask and confounds table, found by name in the run's folder. Folder
listings are cached so each folder is read at most once per discovery.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Iterable

import pandas as pd

from bids_roimae.io.bids_names import SOURCE_KEYS, parse_name

log = logging.getLogger(__name__)

class FolderListings(dict):
    """Cached folder listings, so each folder is read at most once per discovery."""

    def __missing__(self, folder: Path) -> frozenset:
        try:
            self[folder] = frozenset(os.listdir(folder))
        except OSError:
            self[folder] = frozenset()
        return self[folder]


def _read_tr(path: Path) -> float | None:
    try:
        value = json.loads(path.read_text(encoding="utf-8")).get("RepetitionTime")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as err:
        log.warning("ignoring unreadable sidecar %s: %s", path, err)
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
        return float(value)
    return None


def repetition_time(bold: Path, roots: list[Path], listing: FolderListings) -> float | None:
    """RepetitionTime by inheritance: nearest folder first, derivatives before raw; in a
    folder the sidecar with the most matching entities wins."""
    own = set(parse_name(bold.name)[0])
    try:
        rel = bold.parent.relative_to(roots[0])
    except ValueError:  # one of them went through a symbolic link
        rel = bold.parent.resolve().relative_to(roots[0].resolve())
    for root in roots:
        for folder in [root / rel] + [root / p for p in rel.parents]:
            matches = []
            for name in listing[folder]:
                pairs, suffix, ext = parse_name(name)
                if suffix == "bold" and ext == ".json" and set(pairs) <= own:
                    matches.append((len(pairs), name))
            for _, name in sorted(matches, reverse=True):
                tr = _read_tr(folder / name)
                if tr is not None:
                    return tr
    return None


def _companion(bold: Path, listing: FolderListings, pairs, suffix: str, exts: Iterable[str]):
    stem = "_".join(f"{k}-{v}" for k, v in pairs) + f"_{suffix}"
    for ext in exts:
        if stem + ext in listing[bold.parent]:
            return bold.parent / (stem + ext)
    return None


def mean_framewise_displacement(confounds_path) -> float:
    """Mean of fMRIPrep's ``framewise_displacement`` column (its first frame is ``n/a``).

    NaN when the file cannot be read or lacks the column, so a caller can report the run
    as missing a value instead of failing.
    """
    try:
        table = pd.read_csv(confounds_path, sep="\t", usecols=["framewise_displacement"],
                            na_values="n/a")
    except (OSError, ValueError) as err:
        log.warning("no framewise_displacement in %s: %s", confounds_path, err)
        return float("nan")
    return float(table["framewise_displacement"].mean())


def mask_and_confounds(bold: Path, listing: FolderListings):
    """``(brain mask, confounds table)`` beside a BOLD file, each a path or ``None``."""
    pairs, _, ext = parse_name(bold.name)
    exts = [ext] + [e for e in (".nii.gz", ".nii") if e != ext]
    with_brain = [(k, "brain" if k == "desc" else v) for k, v in pairs]
    mask = _companion(bold, listing, with_brain, "mask", exts) or _companion(
        bold, listing, [p for p in pairs if p[0] != "desc"] + [("label", "brain")], "mask", exts)
    source = [p for p in pairs if p[0] in SOURCE_KEYS]
    confounds = None
    for variant in (source, [p for p in source if p[0] != "echo"]):
        for suffix in ("timeseries", "regressors"):
            confounds = confounds or _companion(
                bold, listing, variant + [("desc", "confounds")], suffix, [".tsv"])
    return mask, confounds
