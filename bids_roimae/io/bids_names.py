"""BIDS file names: the one entity table, the parser and the builder of output paths.

Every name this app reads or writes goes through here, so input discovery, derivative
writing and the group report agree on entity names, their order and what a valid label is.

* Entities are known by their BIDS key (``sub``, ``acq``) and their pybids name
  (``subject``, ``acquisition``); :data:`SHORT_TO_PYBIDS` is the one table.
* The schema's entity order is :data:`ENTITY_ORDER`; ``stat-`` is not a BIDS entity and
  goes before ``desc-`` as XCP-D places it (outputs with it need ``.bidsignore``).
* A label is letters and digits only (:func:`check_label`).
"""

from __future__ import annotations

import re
from pathlib import Path

# BIDS key -> pybids entity name (the names ``BoldRun.entities`` and filter files use)
SHORT_TO_PYBIDS = {
    "sub": "subject", "ses": "session", "task": "task", "acq": "acquisition",
    "ce": "ceagent", "rec": "reconstruction", "dir": "direction", "run": "run",
    "echo": "echo", "part": "part", "chunk": "chunk", "space": "space", "cohort": "cohort",
    "res": "res", "den": "den", "atlas": "atlas", "seg": "segmentation", "label": "label",
    "desc": "desc", "trc": "tracer", "mod": "modality", "inv": "inv", "flip": "flip",
    "mt": "mt", "hemi": "hemi", "stat": "stat",
}
PYBIDS_TO_SHORT = {v: k for k, v in SHORT_TO_PYBIDS.items()}
# Long spellings callers may use for derivative entities, beside the pybids names.
_ALIASES = {"resolution": "res", "density": "den", "description": "desc",
            "statistic": "stat"}
# entities that identify an acquisition (the run key); space/res/desc describe a derivative
SOURCE_KEYS = ("sub", "ses", "task", "acq", "ce", "rec", "dir", "run", "echo", "part")
# entity order of the BIDS schema, with stat- before desc-
ENTITY_ORDER = SOURCE_KEYS + ("space", "atlas", "seg", "res", "den", "label", "stat", "desc")

LABEL_RE = re.compile(r"^[A-Za-z0-9]+$")
# one file or folder name: no separator, no leading dot (hidden, "." and ".."), no spaces
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
_EXTENSION_RE = re.compile(r"^(\.[A-Za-z0-9]+)+$")


def short_key(name: str) -> str:
    """The BIDS key of an entity given by key, pybids name or long spelling."""
    return PYBIDS_TO_SHORT.get(name) or _ALIASES.get(name, name)


def check_label(key: str, value) -> str:
    """``value`` as text when it is a valid BIDS label (letters and digits only).

    Raises
    ------
    ValueError
        Naming ``key`` and the offending value.
    """
    text = str(value)
    if not LABEL_RE.match(text):
        raise ValueError(f"{key}-{text!r} is not a BIDS label (letters and digits only)")
    return text


def check_path_component(what: str, value) -> str:
    """``value`` as text when it can name one file or folder inside the output dataset.

    Letters, digits, ``.``, ``_``, ``-`` and ``+``, starting with a letter or digit: no
    ``/``, no ``..``, nothing hidden, so a user-given name never leads outside its folder.

    Raises
    ------
    ValueError
        Naming ``what`` and the offending value.
    """
    text = str(value)
    if not NAME_RE.match(text) or len(text) > 200:
        raise ValueError(f"{what} {text!r} is not a plain name (letters, digits, '.', '_', "
                         f"'-', starting with a letter or digit; no '/' or '..')")
    return text


def parse_name(name: str) -> tuple[list[tuple[str, str]], str, str]:
    """Split a BIDS file name into its entities, suffix and extension.

    Parameters
    ----------
    name : str
        A file name such as ``sub-01_task-rest_space-X_desc-preproc_bold.nii.gz``.

    Returns
    -------
    pairs : list of (str, str)
        ``(BIDS key, value)`` in file-name order.
    suffix : str
    extension : str
        With its leading dot (``".nii.gz"``), or ``""``.
    """
    stem, _, ext = name.partition(".")
    parts = stem.split("_")
    pairs = [tuple(p.split("-", 1)) for p in parts[:-1] if "-" in p]
    return pairs, parts[-1], "." + ext if ext else ""


def name_entities(path) -> dict:
    """``{key: value, ..., "suffix": suffix}`` of a BIDS file name."""
    pairs, suffix, _ = parse_name(Path(path).name)
    return {**dict(pairs), "suffix": suffix}


def _joined(values: dict, suffix: str, extension: str) -> str:
    labels = [f"{k}-{check_label(k, values[k])}" for k in ENTITY_ORDER if k in values]
    check_label("suffix", suffix)
    if not _EXTENSION_RE.match(extension):
        raise ValueError(f"{extension!r} is not a file extension such as '.nii.gz'")
    return "_".join(labels + [suffix]) + extension


def _entity_values(entities: dict) -> dict:
    values = {}
    for key, value in entities.items():
        short = short_key(key)
        if short not in ENTITY_ORDER:
            raise ValueError(f"unknown BIDS entity {key!r} (known: {', '.join(ENTITY_ORDER)})")
        values[short] = value
    return values


def derivative_path(output_dir, source_entities: dict, *, suffix: str, extension: str,
                    datatype: str = "func", **entities) -> Path:
    """Path of a derivative file named from the source run's entities.

    Parameters
    ----------
    output_dir : path
        Root of the derivative dataset.
    source_entities : dict
        Entities of the source file (pybids names such as ``subject``/``acquisition`` or
        BIDS keys such as ``sub``/``acq``); only ``sub ses task acq ce rec dir run echo
        part`` are taken from it.
    suffix : str
        E.g. ``"boldmap"``, ``"dseg"``.
    extension : str
        E.g. ``".nii.gz"``, ``".tsv"``, ``".json"``.
    datatype : str
        Folder under the subject/session (``func``).
    **entities
        ``space``, ``res``, ``atlas``, ``seg``, ``stat``, ``desc``, ... added or
        overriding the source's; ``None`` removes an entity.

    Returns
    -------
    Path
        ``OUTPUT_DIR/sub-<s>/[ses-<ss>/]<datatype>/sub-<s>[_ses-..]..._<suffix><extension>``.

    Raises
    ------
    ValueError
        A value, suffix, datatype or extension that is not a valid BIDS token, an unknown
        entity, or no subject.
    """
    values = {short_key(k): v for k, v in source_entities.items()
              if short_key(k) in SOURCE_KEYS and v is not None}
    for key, value in _entity_values(entities).items():
        if value is None:
            values.pop(key, None)
        else:
            values[key] = value
    if "sub" not in values:
        raise ValueError("derivative_path needs a subject entity")
    check_label("datatype", datatype)
    name = _joined(values, suffix, extension)
    folder = Path(output_dir) / f"sub-{values['sub']}"
    if "ses" in values:
        folder = folder / f"ses-{values['ses']}"
    return folder / datatype / name


def group_path(output_dir, *, suffix: str, extension: str, **entities) -> Path:
    """``OUTPUT_DIR/group/<entities>_<suffix><extension>`` for dataset-level results.

    Entities as in :func:`derivative_path` (no subject; ``None`` values are left out).
    """
    values = {k: v for k, v in _entity_values(entities).items() if v is not None}
    return Path(output_dir) / "group" / _joined(values, suffix, extension)
