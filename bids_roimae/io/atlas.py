"""Atlases: the region labels on the model grid, and ``bids_roimae-fetch``.

Sources, looked up at call time (environment variables are read on every call); the
template that defines the model grid is :mod:`bids_roimae.io.templates`'s:

* **AAL3** (default atlas): ``nilearn.datasets.fetch_atlas_aal(version="3v2")``, cached
  as ``$NILEARN_DATA/aal_3v2/AAL3/AAL3v1.nii`` + ``AAL3v1.xml``. Region names come from the
  XML; region systems from the package table ``data/aal3_systems.tsv``. AAL3 is defined
  in SPM's MNI space and used as is on MNI152NLin2009cAsym (common practice).
* **Any discrete TemplateFlow atlas** by name (``Schaefer2018`` + desc
  ``400Parcels7Networks``): ``tpl-<space>_res-02_atlas-<name>_desc-<desc>_dseg.nii.gz``
  (res-01 when res-02 does not exist; :func:`resample_labels` brings it to the model grid)
  with ``tpl-<space>_atlas-<name>_desc-<desc>_dseg.tsv`` (columns index, name).
* **A user file** ``--atlas-file X.nii.gz`` with ``--atlas-labels X.tsv`` (index, name and
  optionally system); without labels, a same-stem ``X.tsv`` beside it, else regions are
  named ``region-<index>``.

When a resource is neither cached nor downloadable, :class:`MissingInputError` (exit 66)
says in one line what is missing and how to get it.

AAL3 systems (the rule that built ``data/aal3_systems.tsv``, by name prefix):
frontal = Precentral, Frontal_*, Rolandic_Oper, Supp_Motor_Area, Rectus, OFC*,
Paracentral_Lobule; parietal = Postcentral, Parietal_*, SupraMarginal, Angular, Precuneus;
temporal = Heschl, Temporal_* (poles included), Fusiform; occipital = Calcarine, Cuneus,
Lingual, Occipital_*; limbic = Cingulate_*, ACC_*, Hippocampus, ParaHippocampal, Amygdala,
Olfactory (paleocortex); insula = Insula; thalamus = Thalamus and every Thal_* nucleus;
subcortical = Caudate, Putamen, Pallidum, N_Acc and the brainstem nuclei VTA, SN_pc/pr,
Red_N, LC, Raphe; cerebellum = Cerebellum_*; vermis = Vermis_*.
"""

from __future__ import annotations

import logging
import os
import re
import warnings
from dataclasses import dataclass
from importlib import resources as importlib_resources
from pathlib import Path
from typing import Optional, Sequence

import nibabel as nib
import numpy as np
import pandas as pd

from bids_roimae.config import DEFAULT_SPACE
from bids_roimae.errors import BadDataError, MissingInputError, UsageError
from bids_roimae.io.bids_names import LABEL_RE, parse_name
from bids_roimae.io.templates import FETCH_HINT, load_nifti, load_template, templateflow_file

log = logging.getLogger(__name__)

AAL3_FILES = ("AAL3v1.nii", "AAL3v1.xml")  # inside <nilearn data>/aal_3v2/AAL3/


@dataclass
class Atlas:
    """A discrete atlas on its own grid with its label table.

    ``table`` has columns ``index`` (int), ``name`` (str) and ``system`` (str, ``""`` when
    unknown), one row per label (labels listed but absent from the image are kept).
    """

    name: str
    desc: Optional[str]
    img: nib.Nifti1Image
    table: pd.DataFrame
    source: str

    def names(self) -> dict[int, str]:
        """Map label index -> region name."""
        return dict(zip(self.table["index"].astype(int), self.table["name"].astype(str)))


# -- atlases --------------------------------------------------------------------------

def aal3_systems() -> pd.DataFrame:
    """The packaged AAL3v1 table: columns index, name, system (170 rows)."""
    ref = importlib_resources.files("bids_roimae") / "data" / "aal3_systems.tsv"
    with importlib_resources.as_file(ref) as path:
        table = pd.read_csv(path, sep="\t", dtype={"name": str, "system": str})
    table["index"] = table["index"].astype(int)
    return table


def _nilearn_data_dir() -> Optional[str]:
    return os.environ.get("NILEARN_DATA") or None


def _load_aal3() -> Atlas:
    data_dir = _nilearn_data_dir()
    # nilearn takes any existing file as cached; an empty one (interrupted download) would
    # fail later as unreadable, so name it here.
    for base in filter(None, (data_dir, os.environ.get("NILEARN_SHARED_DATA"),
                              str(Path.home() / "nilearn_data"))):
        for name in AAL3_FILES:
            path = Path(base) / "aal_3v2" / "AAL3" / name
            if path.is_file() and path.stat().st_size == 0:
                raise MissingInputError(f"AAL3 file {path} in the nilearn cache is empty: "
                                        f"delete it, then {FETCH_HINT}")
    try:
        from nilearn.datasets import fetch_atlas_aal

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            bunch = fetch_atlas_aal(version="3v2", data_dir=data_dir, verbose=0)
    except Exception as exc:  # requests/urllib/OSError/ValueError (read-only cache)
        where = data_dir or "nilearn's default data folder"
        raise MissingInputError(
            f"AAL3 atlas (aal_3v2/AAL3/{AAL3_FILES[0]} + {AAL3_FILES[1]}) is not in the "
            f"nilearn cache {where} and could not be downloaded ({type(exc).__name__}): "
            f"{FETCH_HINT}") from exc
    img = load_nifti(Path(bunch["maps"]), "AAL3 atlas")
    rows = [(int(i), str(n)) for i, n in zip(bunch["indices"], bunch["labels"]) if int(i) != 0]
    table = pd.DataFrame(rows, columns=["index", "name"])
    reference = aal3_systems()
    systems = dict(zip(reference["name"], reference["system"]))
    table["system"] = [systems.get(n, "") for n in table["name"]]
    return Atlas("AAL3", None, img, table, "nilearn:aal_3v2")


_SCHAEFER_NETWORK = re.compile(r"^\d+Networks_[LR]H_([A-Za-z]+)_")


def _read_label_table(path: Path) -> pd.DataFrame:
    """Read a label TSV (index, name[, system|network]) into the atlas table form."""
    try:
        raw = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    except Exception as exc:
        raise BadDataError(f"atlas labels {path} cannot be read as TSV ({exc})") from exc
    if not {"index", "name"} <= set(raw.columns):
        raise BadDataError(f"atlas labels {path} need columns index and name "
                           f"(found {', '.join(raw.columns)})")
    try:
        index = raw["index"].astype(int)
    except ValueError as exc:
        raise BadDataError(f"atlas labels {path}: column index must hold integers") from exc
    if "system" in raw.columns:
        system = raw["system"]
    elif "network" in raw.columns:
        system = raw["network"]
    else:  # Schaefer names carry their network: 7Networks_LH_Vis_1 -> Vis
        system = raw["name"].map(lambda n: (m.group(1) if (m := _SCHAEFER_NETWORK.match(n))
                                            else ""))
    table = pd.DataFrame({"index": index, "name": raw["name"].astype(str),
                          "system": system.astype(str)})
    return table[table["index"] != 0].reset_index(drop=True)


def _complete_table(table: pd.DataFrame, img: nib.Nifti1Image) -> pd.DataFrame:
    """Add ``region-<index>`` rows for labels in the image that the table lacks."""
    present = np.unique(np.asarray(img.dataobj)).astype(np.int64)
    missing = sorted(set(present[present != 0].tolist()) - set(table["index"].tolist()))
    if missing:
        log.info("atlas labels %s have no name; naming them region-<index>", missing)
        extra = pd.DataFrame({"index": missing, "name": [f"region-{i}" for i in missing],
                              "system": ""})
        table = pd.concat([table, extra], ignore_index=True)
    return table.sort_values("index").reset_index(drop=True)


def _file_stem(path: Path) -> str:
    name = path.name
    for ext in (".nii.gz", ".nii"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return path.stem


def atlas_label(atlas_file) -> str:
    """The BIDS ``atlas-`` label of a user's atlas file.

    Its ``atlas-`` entity when the name is a BIDS name (``tpl-X_atlas-Glasser_dseg``),
    else the file's stem with everything but letters and digits dropped (``my_atlas-v2``
    -> ``myatlasv2``): the label names output files, so it must be one BIDS label.

    Raises
    ------
    UsageError
        The name holds no letter or digit at all.
    """
    stem = _file_stem(Path(atlas_file))
    entities = dict(parse_name(Path(atlas_file).name)[0])
    if LABEL_RE.match(entities.get("atlas", "")):
        return entities["atlas"]
    label = re.sub(r"[^A-Za-z0-9]", "", stem)
    if not label:
        raise UsageError(f"--atlas-file {atlas_file}: its name gives no atlas label "
                         f"(letters and digits); rename it, e.g. myatlas.nii.gz")
    if label != stem:
        log.info("atlas file %s is labelled atlas-%s in the outputs", Path(atlas_file).name,
                 label)
    return label


def check_label_image(img, what: str) -> np.ndarray:
    """The integer labels of a 3D label image, or one line saying why it is not one.

    A ``(X, Y, Z, 1)`` image counts as 3D. Float storage is accepted when every value is
    a whole number (many tools save labels as float32).

    Raises
    ------
    BadDataError
        4D image (several volumes), non-finite or non-integer values, negative labels.
    """
    shape = tuple(img.shape)
    if len(shape) > 3 and any(n != 1 for n in shape[3:]):
        raise BadDataError(f"{what} is {len(shape)}D {shape}: a label atlas is one 3D "
                           f"volume of integer region labels (a probabilistic atlas needs "
                           f"to be turned into labels first)")
    data = np.asanyarray(img.dataobj).reshape(shape[:3])
    if np.issubdtype(data.dtype, np.integer):
        values = data
    else:
        values = data.astype(np.float64)
        if not np.isfinite(values).all():
            raise BadDataError(f"{what} holds NaN/inf values, not region labels")
        fractional = values != np.rint(values)
        if fractional.any():
            example = float(values[fractional][0])
            raise BadDataError(f"{what} holds non-integer values (e.g. {example:g} in "
                               f"{int(fractional.sum())} voxels): region labels must be "
                               f"whole numbers")
    if (values < 0).any():
        raise BadDataError(f"{what} holds negative values, not region labels")
    return np.rint(values).astype(np.int32)


def check_atlas_on_grid(atlas: Atlas, geometry, *, roi_masking: bool) -> None:
    """Refuse an atlas that cannot guide masking or name regions on the model grid.

    Parameters
    ----------
    atlas : Atlas
        The loaded atlas (for its name).
    geometry : TokenGeometry
        Built with the atlas labels on the model grid.
    roi_masking : bool
        Whether ROI-guided masking will draw regions (it needs at least two).

    Raises
    ------
    BadDataError
        No atlas region lies in a brain patch (another space, or no overlap with the
        template brain), no region owns a patch, or fewer than two do for ROI masking.
    """
    labels = np.asarray(geometry.labels)
    inside = np.unique(labels[np.asarray(geometry.voxel_mask) & (labels > 0)])
    owning = geometry.owning_regions()
    where = f"atlas {atlas.name} ({atlas.source})"
    if inside.size == 0:
        raise BadDataError(f"{where} has no region inside the template brain: is it in the "
                           f"template space of --space, and does it overlap the brain?")
    if owning.size == 0 or (roi_masking and owning.size < 2):
        raise BadDataError(f"{where}: {owning.size} region(s) own a brain patch "
                           f"({inside.size} touch the brain); ROI-guided masking needs at "
                           f"least {2 if roi_masking else 1} (use a finer atlas, a smaller "
                           f"--patch-size, "
                           f"--roi-assign any, or --masking random)")


def _load_atlas_file(atlas_file: Path, labels_file: Optional[Path]) -> Atlas:
    atlas_file = Path(atlas_file)
    if not atlas_file.is_file():
        raise MissingInputError(f"--atlas-file {atlas_file}: file not found")
    img = load_nifti(atlas_file, "atlas file")
    what = f"--atlas-file {atlas_file.name}"
    img = nib.Nifti1Image(check_label_image(img, what), img.affine)
    stem = atlas_label(atlas_file)
    if labels_file is not None:
        labels_file = Path(labels_file)
        if not labels_file.is_file():
            raise MissingInputError(f"--atlas-labels {labels_file}: file not found")
    elif (atlas_file.parent / f"{stem}.tsv").is_file():
        labels_file = atlas_file.parent / f"{stem}.tsv"
    table = (_read_label_table(labels_file) if labels_file is not None
             else pd.DataFrame({"index": pd.Series(dtype=int), "name": pd.Series(dtype=str),
                                "system": pd.Series(dtype=str)}))
    return Atlas(stem, None, img, _complete_table(table, img), str(atlas_file))


def _load_templateflow_atlas(name: str, desc: Optional[str], space: str) -> Atlas:
    desc_part = f"_desc-{desc}" if desc else ""
    what = f"atlas {name}{f' ({desc})' if desc else ''} in {space}"
    errors = []
    for res in (2, 1):  # 2 mm is the model grid; 1 mm is resampled later
        filename = f"tpl-{space}_res-{res:02d}_atlas-{name}{desc_part}_dseg.nii.gz"
        try:
            img_path = templateflow_file(space, filename, what)
            break
        except MissingInputError as exc:
            errors.append(exc)
    else:  # prefer the error about a file TemplateFlow has (a failed download)
        raise next((e for e in errors if "does not provide" not in str(e)), errors[0])
    img = load_nifti(img_path, f"TemplateFlow {what}")
    img = nib.Nifti1Image(check_label_image(img, f"TemplateFlow {what}"), img.affine)
    table = None
    for tsv in (f"tpl-{space}_atlas-{name}{desc_part}_dseg.tsv",
                f"tpl-{space}_res-{res:02d}_atlas-{name}{desc_part}_dseg.tsv"):
        try:
            tsv_path = templateflow_file(space, tsv, what)
        except MissingInputError:
            continue
        table = _read_label_table(tsv_path)
        break
    if table is None:
        log.warning("no label table for %s; regions are named region-<index>", what)
        table = pd.DataFrame({"index": pd.Series(dtype=int), "name": pd.Series(dtype=str),
                              "system": pd.Series(dtype=str)})
    return Atlas(name, desc, img, _complete_table(table, img),
                 f"templateflow:{img_path.name}")


def load_atlas(name: str = "AAL3", *, desc: Optional[str] = None,
               atlas_file: Optional[Path] = None, labels_file: Optional[Path] = None,
               space: str = DEFAULT_SPACE) -> Atlas:
    """Load a discrete atlas and its label table (see the module docstring for sources).

    Parameters
    ----------
    name : str
        ``"AAL3"`` (nilearn) or a TemplateFlow atlas name such as ``"Schaefer2018"``.
        Ignored when ``atlas_file`` is given (the file's stem names the atlas).
    desc : str, optional
        TemplateFlow ``desc`` entity (``"400Parcels7Networks"``).
    atlas_file, labels_file : path, optional
        A user label image (3D integers) and its TSV (index, name[, system]).
    space : str
        Template space of TemplateFlow atlases.

    Returns
    -------
    Atlas
        Labels on the atlas's own grid; use :func:`resample_labels` for the model grid.

    Raises
    ------
    MissingInputError
        The atlas is neither cached nor downloadable, or a given file does not exist.
    BadDataError
        A file exists but cannot be read.
    """
    if atlas_file is not None:
        return _load_atlas_file(Path(atlas_file), labels_file)
    if name.upper() == "AAL3" and not desc:
        return _load_aal3()
    return _load_templateflow_atlas(name, desc, space)


def resample_labels(atlas: Atlas, target_img) -> tuple[np.ndarray, list[int]]:
    """Put the atlas labels on the target grid by nearest neighbour.

    Parameters
    ----------
    atlas : Atlas
        Labels on their own grid.
    target_img : nibabel image
        Defines the target grid (shape ``(X, Y, Z)`` and affine); its data are unused.

    Returns
    -------
    labels : ndarray of int32, shape (X, Y, Z)
        Atlas label of every target voxel (0 = none).
    vanished : list of int
        Labels present in the atlas image that no target voxel carries (regions smaller
        than the target voxel spacing). A warning names them.
    """
    source = atlas.img
    if len(source.shape) > 3:  # (X, Y, Z, 1) label images exist in the wild
        source = nib.Nifti1Image(np.asarray(source.dataobj).reshape(source.shape[:3]),
                                 source.affine, source.header)
    target_shape = tuple(target_img.shape[:3])
    source_labels = np.rint(np.asarray(source.dataobj)).astype(np.int32)
    if source.shape[:3] == target_shape and np.allclose(source.affine, target_img.affine,
                                                        atol=1e-4):
        labels = source_labels
    else:
        from nilearn.image import resample_to_img

        source = nib.Nifti1Image(source_labels, source.affine)
        target = nib.Nifti1Image(np.zeros(target_shape, dtype=np.int8), target_img.affine)
        resampled = resample_to_img(source, target, interpolation="nearest",
                                    force_resample=True, copy_header=True)
        labels = np.rint(np.asarray(resampled.dataobj)).astype(np.int32)
    before = set(np.unique(source_labels).tolist()) - {0}
    after = set(np.unique(labels).tolist()) - {0}
    vanished = sorted(before - after)
    if vanished:
        names = atlas.names()
        message = (f"atlas {atlas.name}: {len(vanished)} region(s) vanish on the model grid "
                   f"(smaller than its voxels): "
                   + ", ".join(f"{names.get(i, f'region-{i}')} ({i})" for i in vanished))
        warnings.warn(message, stacklevel=2)
        log.warning("%s", message)
    return labels, vanished


# -- pre-fetching ---------------------------------------------------------------------

def _parse_atlas_spec(spec: str) -> tuple[str, Optional[str]]:
    name, _, desc = spec.partition(":")
    return name, (desc or None)


def fetch_resources(space: str = DEFAULT_SPACE, atlases: Sequence[str] = ("AAL3",),
                    resolution: int = 2) -> list[Path]:
    """Download (or find in the caches) everything a run needs.

    Parameters
    ----------
    space : str
        Template space.
    atlases : sequence of str
        ``"AAL3"`` or ``"<TemplateFlow atlas>[:<desc>]"``, e.g.
        ``"Schaefer2018:400Parcels7Networks"``.
    resolution : int
        TemplateFlow resolution index of the template.

    Returns
    -------
    list of Path
        The cached files (template mask and T1w, then each atlas image).
    """
    template = load_template(space, resolution)
    paths = [template.mask_path] + ([template.t1w_path] if template.t1w_path else [])
    for spec in atlases:
        atlas_name, desc = _parse_atlas_spec(spec)
        atlas = load_atlas(atlas_name, desc=desc, space=space)
        paths.append(Path(atlas.img.get_filename()))
    return paths


def fetch_main(argv: Optional[Sequence[str]] = None) -> None:
    """Console script ``bids_roimae-fetch``: fill the TemplateFlow and nilearn caches."""
    import click

    @click.command(name="bids_roimae-fetch",
                   help="Download the template and atlases into the TemplateFlow "
                        "($TEMPLATEFLOW_HOME) and nilearn ($NILEARN_DATA) caches, so runs "
                        "without internet find them.")
    @click.option("--space", default=DEFAULT_SPACE, show_default=True)
    @click.option("--atlas", "atlases", multiple=True, default=("AAL3",), show_default=True,
                  help="AAL3 or <TemplateFlow atlas>[:<desc>], repeatable.")
    @click.option("--resolution", default=2, show_default=True, type=int)
    def command(space: str, atlases: tuple, resolution: int) -> None:
        try:
            paths = fetch_resources(space, atlases, resolution)
        except (MissingInputError, BadDataError) as exc:
            click.echo(f"bids_roimae-fetch: {exc}", err=True)
            raise SystemExit(exc.exit_code)
        for path in paths:
            click.echo(str(path))

    command.main(args=list(argv) if argv is not None else None, standalone_mode=True)
