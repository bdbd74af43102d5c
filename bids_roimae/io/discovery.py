"""Find the fMRIPrep BOLD runs a command works on.

The fMRIPrep derivatives folder is indexed with pybids without metadata (large datasets
must not be crawled for JSON); the RepetitionTime of the selected runs is read from their
sidecars, following the BIDS inheritance principle over the derivatives folder and, when
it is a separate dataset, the raw BIDS folder. Companion files (brain mask, confounds) are
found by name in the run's folder.

The pybids layout, its saved index and the query it answers are in
:mod:`bids_roimae.io.bids_index`; file names, entity tables, sidecars and companion files in
:mod:`bids_roimae.io.run_files`.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from bids_roimae.config import DEFAULT_SPACE, MODEL_RESOLUTION
from bids_roimae.errors import BadDataError, MissingInputError, NoDataSelected, UsageError
from bids_roimae.io.bids_index import layout_query, open_layout
from bids_roimae.io.bids_names import (
    LABEL_RE,
    PYBIDS_TO_SHORT,
    SHORT_TO_PYBIDS,
    SOURCE_KEYS,
    parse_name,
)
from bids_roimae.io.run_files import FolderListings, mask_and_confounds, repetition_time

log = logging.getLogger(__name__)

# filter-file keys this module sets itself
_RESERVED_FILTERS = {"space", "desc", "extension", "res", "den"}
_FIXED_FILTERS = {"suffix": "bold", "datatype": "func"}


@dataclass(frozen=True)
class BoldRun:
    """One preprocessed BOLD series selected for the model.

    ``entities`` uses pybids names (``subject``, ``session``, ``task``, ``acquisition``,
    ``run``, ``echo``, ``space``, ``res``, ``desc``, ``suffix``, ``extension``,
    ``datatype``) with the values exactly as written in the file name.
    """

    subject: str
    session: str | None
    task: str
    run: str | None
    entities: dict = field(hash=False, compare=False)
    path: Path
    mask_path: Path | None
    confounds_path: Path | None
    tr: float | None
    tr_source: str  # "sidecar" | "header" | "missing"
    space: str

    @property
    def key(self) -> str:
        """Stable identifier built from the acquisition entities, e.g.
        ``sub-01_ses-1_task-rest_run-1``."""
        return "_".join(
            f"{short}-{self.entities[SHORT_TO_PYBIDS[short]]}"
            for short in SOURCE_KEYS
            if self.entities.get(SHORT_TO_PYBIDS[short]) is not None
        )


def normalise_labels(values, prefix) -> list[str]:
    """Labels without their ``<prefix>-`` part, split on whitespace/commas, deduplicated.

    Parameters
    ----------
    values : str, iterable of str or None
        E.g. ``["sub-01 02", "03,sub-01"]``.
    prefix : str
        ``"sub"``, ``"ses"`` or ``"task"`` (a trailing ``-`` is accepted).

    Returns
    -------
    list of str
        ``["01", "02", "03"]`` for the example, in first-seen order.

    Raises
    ------
    UsageError
        If a label is not alphanumeric (BIDS labels are ``[A-Za-z0-9]+``).
    """
    if values is None:
        return []
    if isinstance(values, (str, bytes)):
        values = [values]
    head = prefix.rstrip("-") + "-"
    labels: list[str] = []
    for value in values:
        for part in re.split(r"[\s,]+", str(value).strip()):
            if part.startswith(head):
                part = part[len(head):]
            if not part:
                continue
            if not LABEL_RE.match(part):
                raise UsageError(f"{head}{part!s} is not a valid BIDS label "
                                 f"(letters and digits only)")
            if part not in labels:
                labels.append(part)
    return labels


def _read_description(folder: Path) -> dict | None:
    path = folder / "dataset_description.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BadDataError(f"{path} is not valid JSON: {err}") from err


def _is_derivative(description: dict | None) -> bool:
    """DatasetType "derivative", or GeneratedBy/PipelineDescription naming fMRIPrep."""
    if not description:
        return False
    makers = [g for g in description.get("GeneratedBy", []) if isinstance(g, dict)]
    makers.append(description.get("PipelineDescription") or {})
    return description.get("DatasetType") == "derivative" or any(
        "fmriprep" in str(m.get("Name", "")).lower() for m in makers if isinstance(m, dict))


def _has_preproc_bold(folder: Path) -> bool:
    patterns = ("sub-*/func/*_desc-preproc_bold.nii*", "sub-*/ses-*/func/*_desc-preproc_bold.nii*")
    return any(next(folder.glob(p), None) is not None for p in patterns)


def _missing_description(folder: Path) -> MissingInputError:
    example = '{"Name": "fMRIPrep", "BIDSVersion": "1.4.0", "DatasetType": "derivative", ' \
        '"GeneratedBy": [{"Name": "fMRIPrep"}]}'
    return MissingInputError(
        f"{folder} holds fMRIPrep outputs but no dataset_description.json, so it cannot be "
        f"read as a BIDS derivatives dataset. Add {folder / 'dataset_description.json'} "
        f"(fMRIPrep writes one; a minimal one is {example})."
    )


def find_derivatives(bids_dir: Path, derivatives: Path | None) -> Path:
    """Locate the fMRIPrep derivatives folder.

    Parameters
    ----------
    bids_dir : path
        The BIDS dataset, or the fMRIPrep derivatives folder itself.
    derivatives : path or None
        ``--derivatives``: the fMRIPrep folder (or a ``derivatives`` folder holding
        ``fmriprep``). ``None`` looks in ``BIDS_DIR/derivatives/fmriprep``.

    Returns
    -------
    Path
        Absolute path of the fMRIPrep dataset.

    Raises
    ------
    MissingInputError
        The folder is absent, or holds fMRIPrep outputs without ``dataset_description.json``.
    """
    bids_dir = Path(bids_dir).expanduser().absolute()
    if not bids_dir.is_dir():
        raise MissingInputError(f"BIDS_DIR {bids_dir} does not exist or is not a folder")
    if derivatives is not None:
        candidate = Path(derivatives).expanduser().absolute()
        if not candidate.is_dir():
            raise MissingInputError(f"--derivatives {candidate} does not exist or is not a folder")
        if _read_description(candidate) is None and (candidate / "fmriprep").is_dir():
            candidate = candidate / "fmriprep"
    elif _is_derivative(description := _read_description(bids_dir)):
        return bids_dir
    else:
        candidate = bids_dir / "derivatives" / "fmriprep"
        if not candidate.is_dir():
            if _has_preproc_bold(bids_dir):
                if description is None:
                    raise _missing_description(bids_dir)
                # e.g. a one-subject dataset that CBRAIN assembled from fMRIPrep outputs
                log.warning(
                    "%s holds fMRIPrep outputs but is not marked DatasetType derivative: "
                    "using it as the fMRIPrep folder", bids_dir)
                return bids_dir
            raise MissingInputError(
                f"no fMRIPrep outputs at {candidate}; run fMRIPrep first or point "
                "--derivatives at its output folder"
            )
    if _read_description(candidate) is None:
        raise _missing_description(candidate)
    return candidate


def _check_filters(bold_filters: dict) -> dict:
    """Validated copy of the ``bold`` query of a filter file, keys as pybids names."""
    if not isinstance(bold_filters, dict):
        raise UsageError('the "bold" entry of the BIDS filter file must be a JSON object')
    checked = {}
    for key, value in bold_filters.items():
        name = SHORT_TO_PYBIDS.get(key, key)
        if name in _FIXED_FILTERS:
            if value != _FIXED_FILTERS[name]:
                raise UsageError(f'BIDS filter "{key}": only "{_FIXED_FILTERS[name]}" is supported')
            continue
        if name in _RESERVED_FILTERS:
            raise UsageError(f'BIDS filter "{key}" is set by bids_roimae '
                             f'(use --space for the space)')
        if name not in PYBIDS_TO_SHORT:
            raise UsageError(f'BIDS filter "{key}" is not a known BIDS entity')
        items = value if isinstance(value, list) else [value]
        if not all(v is None or isinstance(v, (str, int)) and not isinstance(v, bool)
                   for v in items):
            raise UsageError(f'BIDS filter "{key}" must be a string, integer, null '
                             f'or a list of them')
        checked[name] = value
    return checked


def load_filter_file(path) -> dict:
    """Read an fMRIPrep-style ``--bids-filter-file``.

    Parameters
    ----------
    path : path
        JSON such as ``{"bold": {"session": "01", "acquisition": null}}``; ``null`` means
        the entity must be absent, a list means any of its values, ``"*"`` any value.

    Returns
    -------
    dict
        The parsed file with its ``bold`` entry validated (keys as pybids entity names).

    Raises
    ------
    UsageError
        Unreadable or invalid JSON, or an unknown/unsupported entity.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UsageError(f"cannot read BIDS filter file {path}: {err}") from err
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise UsageError(f'BIDS filter file {path} must map query names (e.g. "bold") to objects')
    if "bold" in data:
        data["bold"] = _check_filters(data["bold"])
    return data


def _res_rank(res: str | None) -> tuple:
    """Sort key preferring res-2 (the model grid), then no res, then others."""
    if res is not None and res.isdigit() and int(res) == int(MODEL_RESOLUTION):
        return (0, "")
    return (1, "") if res is None else (2, res)


def discover(bids_dir, *, derivatives=None, participant_labels=None, session_labels=None,
             task_labels=None, space=DEFAULT_SPACE, bids_filters=None,
             database_dir=None) -> list[BoldRun]:
    """Select the fMRIPrep BOLD runs to work on.

    Parameters
    ----------
    bids_dir : path
        BIDS dataset (or the fMRIPrep folder itself).
    derivatives : path, optional
        fMRIPrep folder; default ``BIDS_DIR/derivatives/fmriprep``.
    participant_labels, session_labels, task_labels : list of str, optional
        Labels with or without their ``sub-``/``ses-``/``task-`` prefix.
    space : str
        Template space of the runs (``--space``).
    bids_filters : dict, optional
        Parsed filter file; its ``bold`` entry is merged into the query.
    database_dir : path, optional
        Where the pybids index is saved and reused.

    Returns
    -------
    list of BoldRun
        Sorted by ``key``; one file per run (res-2 preferred when several resolutions).

    Raises
    ------
    MissingInputError, NoDataSelected, BadDataError
        No derivatives; labels/filters selecting nothing; runs only in other spaces.
    """
    root = find_derivatives(Path(bids_dir), derivatives)
    raw_root = Path(bids_dir).absolute()
    roots = [root] + ([raw_root] if raw_root != root else [])
    subjects = normalise_labels(participant_labels, "sub")
    filters = _check_filters((bids_filters or {}).get("bold", {}))
    layout = open_layout(root, database_dir)
    if subjects:
        known = set(layout.get(return_type="id", target="subject"))
        missing = [s for s in subjects if s not in known]
        if missing:
            raise NoDataSelected(
                f"participant label(s) not found in {root}: {', '.join(missing)} "
                f"(found: {', '.join(sorted(known)[:10]) or 'none'}"
                f"{' ...' if len(known) > 10 else ''})")
    query = layout_query(subjects, normalise_labels(session_labels, "ses"),
                       normalise_labels(task_labels, "task"), filters)
    found = [Path(p) for p in layout.get(return_type="filename", **query)]
    if not found:
        shown = {k: v for k, v in query.items()
                 if k in ("subject", "session", "task") or k in filters}
        raise NoDataSelected(f"no preprocessed BOLD (*_desc-preproc_bold.nii[.gz]) in {root} "
                             f"matches {shown or 'the selection'}")
    best: dict[tuple, tuple] = {}
    other_spaces = set()
    spaces_of: dict[str, set] = {}  # subject -> spaces of its BOLD not in --space
    with_space = set()
    for path in found:
        pairs = dict(parse_name(path.name)[0])
        if pairs.get("space") != space:
            other = pairs.get("space", "none (native BOLD space)")
            other_spaces.add(other)
            spaces_of.setdefault(pairs.get("sub", "?"), set()).add(other)
            continue
        with_space.add(pairs.get("sub"))
        identity = (path.parent, tuple(sorted((k, v) for k, v in pairs.items()
                                              if k not in ("res", "den"))))
        rank = (_res_rank(pairs.get("res")), path.name)
        if identity not in best or rank < best[identity][0]:
            best[identity] = (rank, path)
    for subject in sorted(set(spaces_of) - with_space):
        log.warning("sub-%s: skipped, no preprocessed BOLD in space %s (found only %s)",
                    subject, space, ", ".join(sorted(spaces_of[subject])))
    if not best:
        raise BadDataError(
            f"BOLD found only in spaces {', '.join(sorted(other_spaces))}; rerun fMRIPrep with "
            f"--output-spaces {space}:res-{MODEL_RESOLUTION} (or choose one of them with --space)")
    listing = FolderListings()
    runs = []
    for _, path in best.values():
        pairs, suffix, ext = parse_name(path.name)
        entities = {SHORT_TO_PYBIDS.get(k, k): v for k, v in pairs}
        entities.update(suffix=suffix, extension=ext, datatype=path.parent.name)
        mask, confounds = mask_and_confounds(path, listing)
        tr = repetition_time(path, roots, listing)
        runs.append(BoldRun(
            subject=entities["subject"], session=entities.get("session"), task=entities["task"],
            run=entities.get("run"), entities=entities, path=path, mask_path=mask,
            confounds_path=confounds, tr=tr, tr_source="missing" if tr is None else "sidecar",
            space=space))
    return sorted(runs, key=lambda r: (r.key, r.path.name))


def read_participants(bids_dir):
    """Read ``participants.tsv`` of a BIDS dataset.

    Parameters
    ----------
    bids_dir : path
        Folder holding ``participants.tsv``.

    Returns
    -------
    pandas.DataFrame
        All columns as strings (``"n/a"`` kept verbatim), names stripped of spaces;
        index ``participant`` = label without ``sub-``.

    Raises
    ------
    MissingInputError
        No ``participants.tsv``.
    BadDataError
        Empty file, no ``participant_id`` column, or repeated participants.
    """
    path = Path(bids_dir) / "participants.tsv"
    if not path.is_file():
        raise MissingInputError(f"{path} not found; it holds the labels to fine-tune on")
    try:
        table = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as err:
        raise BadDataError(f"cannot read {path}: {err}") from err
    table.columns = [str(c).strip() for c in table.columns]
    if "participant_id" not in table.columns:
        raise BadDataError(f"{path} has no participant_id column "
                           f"(columns: {', '.join(table.columns)})")
    labels = table["participant_id"].str.strip().str.removeprefix("sub-")
    repeated = sorted(set(labels[labels.duplicated()]))
    if repeated:
        raise BadDataError(f"{path} lists participants more than once: {', '.join(repeated)}")
    table.index = pd.Index(labels, name="participant")
    return table
