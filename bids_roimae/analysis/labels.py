"""Supervised targets from ``participants.tsv``: column lookup, value cleaning, classes.

Phenotypic tables as released by sites are messy: codes are stored as text (``"1"``,
``" 1"``, ``"1.0"``), missing values are spelled ``n/a``, ``N/A``, ``-999``, ``pending`` or
left empty, and headers carry stray spaces (ADHD-200's ``"Secondary Dx "``). This module
turns such a column into one clean label per subject and says how many subjects it left
out and why.

Rules
-----
* Column names match after trimming spaces, ignoring case (``--target dx`` finds ``"DX"``,
  ``--target "secondary dx"`` finds ``"Secondary Dx "``).
* Values compare as trimmed strings; numeric strings compare as numbers, so ``"1"``,
  ``" 1"`` and ``"1.0"`` are the same code.
* Missing values (:data:`MISSING_TOKENS`, any negative ``-9...9`` sentinel such as
  ``-999``) are excluded and counted per spelling.
* ``binary``: ``positive`` lists the codes of the positive class; every other valid code is
  negative (ADHD-200: ``--positive 1 2 3`` makes DX 0 the control class). Without
  ``positive`` the column must hold exactly two valid values, both numeric: the larger is
  positive (0/1, 1/2 coding). Two text values, or more than two values, need ``positive``
  (usage error, exit 64) so the direction is never guessed.
* ``multiclass``: one class per distinct valid code, ordered numerically when all codes are
  numbers, else alphabetically.
* ``regression``: numeric values; text that is not a number is excluded and counted.

Errors: a missing column is a usage error (64) listing the available columns; fewer than
two classes (or a constant regression target) among the kept subjects is bad data (65).
"""

from __future__ import annotations

import logging
import math
import re
from collections import Counter
from typing import Iterable, Optional, Sequence

import pandas as pd

from bids_roimae.errors import BadDataError, MissingInputError, UsageError

log = logging.getLogger(__name__)

TASK_TYPES = ("binary", "multiclass", "regression")

#: Spellings of "no value" (compared after trimming, case-insensitively).
MISSING_TOKENS = frozenset({"", "n/a", "na", "nan", "none", "null", "pending", "missing",
                            "unknown", "?", "."})
_SENTINEL = re.compile(r"^-9{2,}(\.0+)?$")  # -99, -999, -9999 (and -999.0)


def find_column(columns: Iterable[str], name: str) -> str:
    """Return the column whose trimmed, case-folded name equals ``name``'s.

    Raises
    ------
    UsageError
        No column matches (the message lists the available ones), or several do.
    """
    columns = [str(c) for c in columns]
    wanted = str(name).strip().casefold()
    hits = [c for c in columns if c.strip().casefold() == wanted]
    if not hits:
        available = ", ".join(repr(c.strip()) for c in columns) or "none"
        raise UsageError(f"participants.tsv has no column {name.strip()!r} "
                         f"(available: {available})")
    if len(hits) > 1:
        raise UsageError(f"column name {name.strip()!r} is ambiguous in participants.tsv: "
                         f"{', '.join(repr(h) for h in hits)}")
    return hits[0]


def normalise_value(value) -> Optional[str]:
    """Canonical text of one cell, or ``None`` when it means "missing".

    ``" 1"``, ``"1"``, ``"1.0"`` and ``1`` all give ``"1"``; ``"2.50"`` gives ``"2.5"``;
    text is trimmed but keeps its case.
    """
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    text = str(value).strip()
    if text.casefold() in MISSING_TOKENS or _SENTINEL.match(text):
        return None
    number = _as_number(text)
    if number is None:
        return text
    if not math.isfinite(number):
        return None
    return str(int(number)) if number.is_integer() else repr(number)


def _as_number(text: str) -> Optional[float]:
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def _missing_reason(value) -> str:
    """How a missing cell was spelled, for the exclusion counts."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "missing:empty"
    text = str(value).strip()
    return f"missing:{text.casefold() or 'empty'}"


def _sorted_codes(codes: Iterable[str]) -> list[str]:
    codes = sorted(set(codes))
    if codes and all(_as_number(c) is not None for c in codes):
        return sorted(codes, key=float)
    return codes


def subject_labels(participants: pd.DataFrame) -> pd.Index:
    """Subject labels without ``sub-``: the ``participant_id`` column, else the index."""
    col = next((c for c in participants.columns
                if str(c).strip().casefold() == "participant_id"), None)
    raw = participants[col] if col is not None else participants.index.to_series()
    labels = [re.sub(r"^sub-", "", str(v).strip()) for v in raw]
    return pd.Index(labels, name="participant")


def parse_labels(participants: pd.DataFrame, target: str,
                 positive: Optional[Sequence] = None, task_type: str = "binary"
                 ) -> tuple[pd.Series, dict]:
    """One clean label per subject from a ``participants.tsv`` column.

    Parameters
    ----------
    participants : DataFrame
        ``participants.tsv`` as read with every column as text, indexed by subject label
        without ``sub-`` (or holding a ``participant_id`` column).
    target : str
        Column name (matched after trimming spaces, case-insensitively).
    positive : sequence, optional
        Binary only: codes of the positive class (compared as normalised values).
    task_type : {"binary", "multiclass", "regression"}

    Returns
    -------
    labels : Series, shape (n_kept,)
        Indexed by subject label: 0/1 (binary), class index (multiclass) or float
        (regression). ``labels.attrs`` holds the same mapping as ``info``.
    info : dict
        ``target`` (column as written), ``task_type``, ``classes`` (original code(s) of each
        class index; binary: ``["negative", "positive"]``), ``positive`` and ``negative``
        code lists (binary), ``class_counts``, ``n_rows``, ``n_kept`` and ``excluded``
        (``{reason: count}``, e.g. ``{"missing:n/a": 3, "missing:pending": 1}``).

    Raises
    ------
    UsageError
        Unknown ``task_type``, missing column, binary direction that cannot be inferred,
        ``positive`` with a non-binary task.
    BadDataError
        Fewer than two classes among the kept subjects, or a constant regression target.
    """
    if task_type not in TASK_TYPES:
        raise UsageError(f"--task-type must be one of {', '.join(TASK_TYPES)}, "
                         f"not {task_type!r}")
    positive = [p for p in (positive or ()) if str(p).strip() != ""]
    if positive and task_type != "binary":
        raise UsageError(f"--positive applies to binary targets, not {task_type}")
    column = find_column(participants.columns, target)
    subjects = subject_labels(participants)
    excluded: Counter = Counter()
    codes: dict[str, str] = {}
    for subject, raw in zip(subjects, participants[column].tolist()):
        if subject in codes:
            excluded["duplicate participant"] += 1
            continue
        code = normalise_value(raw)
        if code is None:
            excluded[_missing_reason(raw)] += 1
            continue
        if task_type == "regression" and _as_number(code) is None:
            excluded["not numeric"] += 1
            continue
        codes[subject] = code
    info = {"target": column.strip(), "column": column, "task_type": task_type,
            "n_rows": int(len(participants))}

    if task_type == "regression":
        values = pd.Series({s: float(c) for s, c in codes.items()}, dtype=float)
        if values.size < 2 or float(values.std(ddof=0)) == 0.0:
            raise BadDataError(f"target {info['target']!r} has fewer than two distinct "
                               f"numeric values among {values.size} subjects")
        info.update(classes=[], positive=[], negative=[], class_counts={})
        return _finish(values, info, excluded)

    present = _sorted_codes(codes.values())
    if task_type == "binary":
        pos_codes = _positive_codes(info["target"], positive, present)
        neg_codes = [c for c in present if c not in pos_codes]
        missing_pos = [p for p in pos_codes if p not in present]
        if missing_pos:
            log.warning("--positive value(s) %s do not occur in column %r",
                        ", ".join(missing_pos), info["target"])
        values = pd.Series({s: int(c in pos_codes) for s, c in codes.items()}, dtype="int64")
        info.update(classes=["negative", "positive"], positive=pos_codes, negative=neg_codes)
    else:
        values = pd.Series({s: present.index(c) for s, c in codes.items()}, dtype="int64")
        info.update(classes=present, positive=[], negative=[])
    counts = values.value_counts().sort_index()
    info["class_counts"] = {str(info["classes"][int(k)]): int(v) for k, v in counts.items()}
    if counts.size < 2:
        raise BadDataError(f"target {info['target']!r} has fewer than two classes among "
                           f"{values.size} labelled subjects ({info['class_counts']})")
    return _finish(values, info, excluded)


def _positive_codes(target: str, positive: list, present: list[str]) -> list[str]:
    if positive:
        codes = []
        for p in positive:
            code = normalise_value(p)
            if code is None:
                raise UsageError(f"--positive {p!r} is a missing-value code")
            codes.append(code)
        return _sorted_codes(codes)
    if len(present) == 2 and all(_as_number(c) is not None for c in present):
        return [present[1]]  # numeric 0/1 (or 1/2) coding: the larger code is the case
    shown = ", ".join(present[:12]) + (" ..." if len(present) > 12 else "")
    raise UsageError(f"column {target!r} holds {len(present)} values ({shown}); say which "
                     f"are the positive class with --positive")


def _finish(values: pd.Series, info: dict, excluded: Counter) -> tuple[pd.Series, dict]:
    values.index.name = "participant"
    info["excluded"] = dict(sorted(excluded.items()))
    info["n_kept"] = int(values.size)
    if excluded:
        log.info("target %r: %d subjects labelled, excluded %s", info["target"],
                 values.size, info["excluded"])
    values.attrs.update(label_attrs(info))
    return values, info


def label_attrs(info: dict) -> dict:
    """The part of ``info`` a fine-tuned model stores to decode its outputs."""
    return {k: info[k] for k in ("target", "task_type", "classes", "positive", "negative")
            if k in info}


def parse_groups(participants: pd.DataFrame, column: str,
                 subjects: Optional[Iterable[str]] = None) -> tuple[pd.Series, dict]:
    """Cross-validation groups (e.g. site) per subject, missing values dropped and counted.

    Returns
    -------
    groups : Series of str, indexed by subject label
    info : dict with ``column``, ``n_groups`` and ``excluded`` counts
    """
    col = find_column(participants.columns, column)
    labels = subject_labels(participants)
    wanted = None if subjects is None else set(subjects)
    excluded: Counter = Counter()
    groups = {}
    for subject, raw in zip(labels, participants[col].tolist()):
        if wanted is not None and subject not in wanted:
            continue
        code = normalise_value(raw)
        if code is None:
            excluded[_missing_reason(raw)] += 1
        else:
            groups.setdefault(subject, code)
    series = pd.Series(groups, dtype=object)
    series.index.name = "participant"
    return series, {"column": col.strip(), "n_groups": int(series.nunique()),
                    "excluded": dict(excluded)}


def align_labels(labels: pd.Series, entries: Sequence, groups: Optional[pd.Series] = None
                 ) -> tuple[pd.Series, list, Optional[pd.Series], dict]:
    """Keep subjects that have both a label and at least one prepared run.

    Parameters
    ----------
    labels : Series indexed by subject label
    entries : sequence of cache entries (``.subject`` without ``sub-``)
    groups : Series, optional
        CV group per subject; subjects without a group are dropped too.

    Returns
    -------
    labels, entries, groups, info
        Labels and groups restricted to the kept subjects (sorted), the entries of those
        subjects, and counts: ``labelled_without_runs``, ``runs_without_label``,
        ``without_group``.

    Raises
    ------
    MissingInputError
        No labelled subject has a prepared run (exit 66).
    BadDataError
        The kept subjects hold fewer than two classes.
    """
    with_runs = {str(e.subject) for e in entries}
    keep = sorted(set(labels.index) & with_runs)
    info = {"labelled_without_runs": sorted(set(labels.index) - with_runs),
            "runs_without_label": sorted(with_runs - set(labels.index)),
            "without_group": []}
    if groups is not None:
        info["without_group"] = sorted(s for s in keep if s not in groups.index)
        keep = [s for s in keep if s in groups.index]
    for key, what in (("labelled_without_runs", "labelled subjects have no prepared run"),
                      ("runs_without_label", "subjects with prepared runs have no label"),
                      ("without_group", "subjects have no cross-validation group")):
        if info[key]:
            log.warning("%d %s (skipped): %s", len(info[key]), what,
                        ", ".join(info[key][:10]) + (" ..." if len(info[key]) > 10 else ""))
    if not keep:
        raise MissingInputError(f"none of the {labels.size} labelled subjects has a prepared "
                                f"run (prepared: {len(with_runs)} subjects)")
    attrs = dict(labels.attrs)
    kept = labels.loc[keep].copy()
    kept.attrs.update(attrs)
    if attrs.get("task_type", "binary") != "regression" and kept.nunique() < 2:
        raise BadDataError(f"the {len(keep)} labelled subjects with prepared runs hold only "
                           f"one class of {attrs.get('target', 'the target')!r}")
    kept_set = set(keep)
    entries = [e for e in entries if str(e.subject) in kept_set]
    info["counts"] = {k: len(v) for k, v in info.items() if isinstance(v, list)}
    return kept, entries, None if groups is None else groups.loc[keep], info

