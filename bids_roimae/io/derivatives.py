"""Write OUTPUT_DIR as a BIDS derivatives dataset.

Every file name is built from BIDS entities
(:func:`bids_roimae.io.bids_names.derivative_path`), never by joining
user text; every write is atomic (a unique temporary file in the same folder, then
``os.replace``; :mod:`bids_roimae.io.atomic`), so concurrent participant jobs never leave a
half-written file.

What ``bids-validator-deno`` 3.0.2 (schema 1.2.7, BIDS 1.11) accepts in a derivative
dataset, found by running it on small trees written with this module. The passing
invocation is ``bids-validator-deno OUTPUT_DIR`` (exit code 0, warnings only):
``DatasetType: "derivative"`` in ``dataset_description.json`` already selects the
derivative rules; ``--datasetTypes derivative`` gives the same result and is not needed.

* Entity order is the schema's: ``sub ses task acq ce rec dir run echo part space atlas
  seg res den label desc``. ``atlas-`` goes **after** ``space-`` and before ``res-``
  (``..._space-X_res-2_atlas-Y`` fails with FILENAME_MISMATCH). ``stat-`` is not a BIDS
  entity; it is placed before ``desc-`` (as XCP-D does) and needs ``.bidsignore``.
* Validate in ``sub-<l>/[ses-<l>/]func/``: ``_dseg.nii.gz`` (with ``atlas-``/``seg-``),
  ``_probseg.nii.gz``, ``_mask.nii.gz``, ``_dseg.tsv``, each with a JSON sidecar.
  ``_bold.nii.gz`` must be 4D with ``SkullStripped`` and (with ``res-``) ``Resolution``.
* Validate at the top level: ``space-<s>_atlas-<a>_res-<r>_dseg.nii.gz`` (+ ``.json``),
  ``atlas-<a>_dseg.tsv``, ``atlas-<a>_description.json``. The XCP-D style name
  ``atlas-<a>_space-<s>_res-<r>_dseg.nii.gz`` fails (entity order), so
  :func:`write_atlas_files` writes the schema order.
* Need ``.bidsignore``: 3D maps with any non-schema suffix (``_boldmap``, ``_statmap``),
  anything with ``stat-``, region tables other than ``dseg.tsv`` (``_stats.tsv``,
  ``_timeseries.tsv``), figures (``.svg``, ``.png``: a ``_bold.svg`` matches BIDS rules and
  fails them), ``.html`` reports, and the ``cache``, ``models``, ``logs`` folders. Figures
  must not get a JSON sidecar of their own unless it is ignored as well
  (SIDECAR_WITHOUT_DATAFILE).
* Folder patterns must not end in ``/`` when the folder has sub-folders: with ``models/``
  the validator still reports ``/models/`` itself (NOT_INCLUDED), with ``models`` it does
  not. :func:`write_bidsignore` drops the trailing slash for that reason.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np

from bids_roimae import __version__
from bids_roimae.errors import OutputError
from bids_roimae.io import atomic
from bids_roimae.io.bids_names import check_label

CODE_URL = "https://github.com/bidsroimae/bids_roimae"
BIDS_VERSION = "1.10.0"


def write_text(path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (UTF-8, fsynced; folders created).

    Parameters
    ----------
    path : path-like
        Destination.
    text : str
        The complete content.

    Returns
    -------
    Path
        ``path``.
    """
    return atomic.write_text(path, text)


def write_tsv(path, table, column_descriptions: dict | None = None) -> Path:
    """Write a table as a BIDS TSV atomically, with a sidecar describing its columns.

    Parameters
    ----------
    path : path-like
        Destination ``.tsv``.
    table : pandas.DataFrame
        Written without its index; missing values as ``n/a``, floats with 6 significant
        digits, ``\\n`` line ends.
    column_descriptions : dict, optional
        ``{column: description}``; the sidecar (same name, ``.json``) describes the
        columns of ``table`` found here. ``None`` writes no sidecar.

    Returns
    -------
    Path
        ``path``.
    """
    text = table.to_csv(sep="\t", index=False, na_rep="n/a", lineterminator="\n",
                        float_format="%.6g")
    write_text(path, text)
    if column_descriptions is not None:
        write_sidecar(path, {c: {"Description": d} for c, d in column_descriptions.items()
                             if c in table})
    return path


def _plain(value):
    """JSON-ready copy: numpy scalars/arrays to Python, paths to str, NaN/inf to null."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_plain(v) for v in value]
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        return _plain(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value


def _json_text(data) -> str:
    return json.dumps(_plain(data), sort_keys=True, indent=2, allow_nan=False) + "\n"


def write_json(path, data) -> Path:
    """Write ``data`` as JSON atomically (sorted keys, indent 2; NaN written as null)."""
    text = _json_text(data)
    return write_text(path, text)


def _stem(path: Path) -> str:
    return path.name.split(".", 1)[0]


def write_sidecar(image_path, metadata) -> Path:
    """Write the JSON sidecar of ``image_path`` (same name, ``.json`` extension)."""
    image_path = Path(image_path)
    return write_json(image_path.with_name(_stem(image_path) + ".json"), metadata or {})


def save_image(img, path, metadata) -> Path:
    """Save a NIfTI image atomically and write its sidecar.

    Parameters
    ----------
    img : nibabel image
    path : path
        Destination ending in ``.nii.gz`` or ``.nii`` (the temporary file keeps the
        extension so nibabel writes the same format).
    metadata : dict
        Sidecar content.

    Returns
    -------
    Path
        ``path``.
    """
    path = Path(path)
    atomic.write_via(path, lambda tmp: nib.save(img, tmp), fsync=False, keep_suffix=True)
    write_sidecar(path, metadata)
    return path


# Files container engines put into every container they run: how the outputs can record
# the engine that runs the image whatever the image was built with.
CONTAINER_MARKERS = (("podman", Path("/run/.containerenv")), ("docker", Path("/.dockerenv")))


def container_provenance() -> dict | None:
    """``GeneratedBy.Container`` of this run: the engine running it and the image.

    ``Type`` is the engine: Apptainer/Singularity (from their environment), else
    ``BIDS_ROIMAE_CONTAINER_TYPE`` when set, else podman or docker from the marker files
    they create. ``Tag`` is the image as built (``BIDS_ROIMAE_CONTAINER_TAG``, set from
    the Dockerfile's ``IMAGE_TAG``), else the SIF file name; Apptainer runs also give the
    SIF as ``URI``. ``None`` outside a container.
    """
    apptainer = os.environ.get("APPTAINER_CONTAINER") or os.environ.get("SINGULARITY_CONTAINER")
    tag = os.environ.get("BIDS_ROIMAE_CONTAINER_TAG")
    if apptainer:  # a Docker image run by Apptainer inherits the Docker variables
        kind = "apptainer" if os.environ.get("APPTAINER_CONTAINER") else "singularity"
        record = {"Type": kind, "Tag": tag or Path(apptainer).name}
        if tag and Path(apptainer).is_absolute():
            record["URI"] = Path(apptainer).as_uri()
        return record
    kind = os.environ.get("BIDS_ROIMAE_CONTAINER_TYPE")
    if not kind and tag:  # built as our image: which engine runs it?
        kind = next((name for name, marker in CONTAINER_MARKERS if marker.exists()), None)
    if kind or tag:
        return {k: v for k, v in (("Type", kind), ("Tag", tag)) if v}
    return None


def write_dataset_description(output_dir, *, source_datasets: list[str],
                              name: str = "bids_roimae outputs") -> Path:
    """Write ``dataset_description.json``; safe when many jobs start at once.

    Parameters
    ----------
    output_dir : path
    source_datasets : list of str
        Paths or URLs of the inputs; paths become ``file://`` URLs.
    name : str

    Returns
    -------
    Path
        The description; an existing file with the same content is left untouched.
    """
    generated = {"Name": "bids_roimae", "Version": __version__, "CodeURL": CODE_URL}
    container = container_provenance()
    if container:
        generated["Container"] = container
    sources = [{"URL": s if "://" in str(s) else Path(s).absolute().as_uri()}
               for s in source_datasets]
    description = {"Name": name, "BIDSVersion": BIDS_VERSION, "DatasetType": "derivative",
                   "GeneratedBy": [generated], "SourceDatasets": sources}
    path = Path(output_dir) / "dataset_description.json"
    try:
        if json.loads(path.read_text(encoding="utf-8")) == _plain(description):
            return path
    except (OSError, ValueError):
        pass  # absent or unreadable: (re)write it
    return write_json(path, description)


def write_bidsignore(output_dir, patterns: list[str]) -> Path:
    """Add ``patterns`` to ``.bidsignore`` keeping the lines already there.

    A trailing ``/`` is dropped: the validator still reports ``dir/`` itself when it has
    sub-folders. Concurrent writers are serialised with a lock file where ``fcntl`` exists.
    """
    path = Path(output_dir) / ".bidsignore"
    path.parent.mkdir(parents=True, exist_ok=True)
    wanted = [p.strip().rstrip("/") for p in patterns if p.strip().rstrip("/")]
    if any("\n" in p for p in patterns):
        raise ValueError(".bidsignore patterns are single lines")
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        fcntl = None
    with open(path.parent / ".bidsignore.lock", "a") as lock:
        if fcntl:
            fcntl.flock(lock, fcntl.LOCK_EX)
        lines = path.read_text(encoding="utf-8").splitlines() if path.exists() else []
        merged = lines + [p for p in dict.fromkeys(wanted) if p not in lines]
        if merged != lines or not path.exists():
            write_text(path, "".join(f"{line}\n" for line in merged))
    return path


def write_atlas_files(output_dir, atlas_name, labels_img, table, space, res) -> dict:
    """Write the atlas as used, at the top level of OUTPUT_DIR.

    Parameters
    ----------
    output_dir : path
    atlas_name : str
        BIDS label, e.g. ``"AAL3"``.
    labels_img : nibabel image
        3D integer labels on the model grid (``(X, Y, Z)``).
    table : pandas.DataFrame
        Columns ``index``, ``name`` and optionally ``system``.
    space : str
    res : str or int

    Returns
    -------
    dict
        ``{"image", "sidecar", "table", "description"}`` paths:
        ``space-<space>_atlas-<name>_res-<res>_dseg.nii.gz`` (schema entity order),
        its ``.json``, ``atlas-<name>_dseg.tsv`` and ``atlas-<name>_description.json``.
    """
    name, space, res = (check_label("atlas", atlas_name), check_label("space", space),
                        check_label("res", res))
    missing = {"index", "name"} - set(table.columns)
    if missing:
        raise ValueError(f"atlas table lacks column(s) {', '.join(sorted(missing))}")
    data = np.asanyarray(labels_img.dataobj)
    if data.ndim != 3:
        raise ValueError(f"atlas labels must be 3D, got shape {data.shape}")
    if not np.issubdtype(data.dtype, np.integer):
        if not np.all(np.isfinite(data)) or not np.array_equal(data, np.round(data)):
            raise ValueError("atlas labels must be whole numbers")
    labels = data.astype(np.int16 if np.abs(data).max(initial=0) < 2**15 else np.int32)
    img = nib.Nifti1Image(labels, labels_img.affine)
    img.header.set_xyzt_units("mm")
    out = Path(output_dir)
    zooms = img.header.get_zooms()[:3]
    image = save_image(img, out / f"space-{space}_atlas-{name}_res-{res}_dseg.nii.gz",
                       {"Atlas": name, "Space": space,
                        "Resolution": {res: f"{space} template grid, voxels of "
                                            f"{' x '.join(f'{z:g}' for z in zooms)} mm"},
                        "Description": f"{name} regions resampled to the model grid"})
    columns = ["index", "name"] + (["system"] if "system" in table.columns else [])
    tsv = table[columns].sort_values("index").to_csv(sep="\t", index=False, lineterminator="\n")
    table_path = write_text(out / f"atlas-{name}_dseg.tsv", tsv)
    description = write_json(out / f"atlas-{name}_description.json",
                             {"Name": name, "Description": f"{name} atlas as used by bids_roimae"})
    return {"image": image, "sidecar": out / f"space-{space}_atlas-{name}_res-{res}_dseg.json",
            "table": table_path, "description": description}


def is_own_dataset(folder) -> bool:
    """Whether ``folder/dataset_description.json`` was written by this app."""
    try:
        description = json.loads((Path(folder) / "dataset_description.json").read_text(
            encoding="utf-8"))
    except (OSError, ValueError):
        return False
    generated = description.get("GeneratedBy") if isinstance(description, dict) else None
    return isinstance(generated, list) and any(
        isinstance(g, dict) and g.get("Name") == "bids_roimae" for g in generated)


def output_location_problem(output_dir, input_dirs) -> str | None:
    """Why OUTPUT_DIR may not be used, in one line, or ``None`` when it may.

    Writing ``dataset_description.json`` and outputs there would damage another dataset
    when OUTPUT_DIR is, or is inside, one of ``input_dirs`` (BIDS_DIR, the fMRIPrep
    derivatives) other than below a ``derivatives/`` folder of a raw dataset, or is, or is
    inside, any dataset whose ``dataset_description.json`` this app did not write (again
    except below its ``derivatives/``, where BIDS puts pipelines' outputs).

    Parameters
    ----------
    output_dir : path
    input_dirs : sequence of path
        The input datasets, first the raw BIDS_DIR, then the fMRIPrep folder.
    """
    out = Path(output_dir).expanduser().absolute().resolve()
    inputs = [Path(p).expanduser().absolute().resolve() for p in input_dirs if p is not None]
    for folder in inputs[1:]:
        if out == folder or folder in out.parents:
            return (f"OUTPUT_DIR {out} is inside the fMRIPrep derivatives {folder}: its "
                    f"dataset_description.json and files would be overwritten; choose a "
                    f"folder of its own (e.g. {folder.parent / 'bids_roimae'})")
    for folder in [out, *out.parents]:
        if not (folder / "dataset_description.json").is_file():
            continue
        if is_own_dataset(folder):
            return None
        inside = out.relative_to(folder).parts
        if inside and inside[0] == "derivatives":
            return None  # a pipeline's folder under a raw dataset's derivatives/
        where = "is" if folder == out else "is inside"
        return (f"OUTPUT_DIR {out} {where} the dataset {folder}, whose "
                f"dataset_description.json was not written by bids_roimae; choose an empty "
                f"folder or one under {folder / 'derivatives'}")
    if inputs and inputs[0] in out.parents:
        inside = out.relative_to(inputs[0]).parts
        if inside[0] != "derivatives":
            return (f"OUTPUT_DIR {out} is inside BIDS_DIR {inputs[0]} but not under its "
                    f"derivatives/ folder")
    return None


def ensure_output_dir(path) -> Path:
    """Create ``path`` (with parents) and check it is writable.

    Raises
    ------
    OutputError
        Exit code 73 when the folder cannot be created or written.
    """
    path = Path(path).expanduser().absolute()
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".write-test.")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise OutputError(f"cannot write to output folder {path}: {err.strerror or err}") from err
    return path
