"""TemplateFlow templates: the model grid (brain mask) and the T1w for figures.

A non-empty file already in ``$TEMPLATEFLOW_HOME/tpl-<space>/`` (default
``~/.cache/templateflow``) is used as is; otherwise it is downloaded from TemplateFlow's
store into that cache when TemplateFlow's file list has it. The environment is read on
every call (TemplateFlow's own package reads it once, at import). When a file is
neither cached nor downloadable, :class:`MissingInputError` (exit 66) says in one line
what is missing and how to get it.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import nibabel as nib

from bids_roimae.config import DEFAULT_SPACE, MODEL_RESOLUTION
from bids_roimae.errors import BadDataError, MissingInputError
from bids_roimae.io.atomic import write_via

log = logging.getLogger(__name__)

#: Seconds a TemplateFlow download waits on the network, so an offline call fails quickly.
TEMPLATEFLOW_TIMEOUT = 10
TEMPLATEFLOW_S3 = "https://templateflow.s3.amazonaws.com"  # TemplateFlow's file store
FETCH_HINT = ("run bids_roimae-fetch on a machine with internet, or set "
              "TEMPLATEFLOW_HOME / NILEARN_DATA to a populated cache")


@dataclass
class Template:
    """The model grid: a template brain mask (its shape and affine define the grid)."""

    space: str
    resolution: int
    mask_img: nib.Nifti1Image
    mask_path: Path
    t1w_path: Optional[Path]


# -- TemplateFlow ---------------------------------------------------------------------

def templateflow_home() -> Path:
    """The TemplateFlow cache folder: ``$TEMPLATEFLOW_HOME`` or TemplateFlow's default."""
    env = os.environ.get("TEMPLATEFLOW_HOME")
    if env:
        return Path(env).expanduser().absolute()
    try:  # TemplateFlow's own default (it depends on platformdirs)
        from platformdirs import user_cache_dir

        return Path(user_cache_dir("templateflow")).absolute()
    except ImportError:  # pragma: no cover
        return Path.home() / ".cache" / "templateflow"


def _templateflow_listing() -> Optional[set]:
    """File names TemplateFlow serves, from the skeleton zip shipped with its client.

    Found without importing ``templateflow`` (importing it populates a cache folder).
    """
    import importlib.util
    import zipfile

    spec = importlib.util.find_spec("templateflow")
    if spec is None or not spec.submodule_search_locations:
        return None
    skeleton = Path(list(spec.submodule_search_locations)[0]) / "conf" / "templateflow-skel.zip"
    try:
        with zipfile.ZipFile(skeleton) as archive:
            return set(archive.namelist())
    except (OSError, zipfile.BadZipFile):
        return None


def _download(url: str, target: Path) -> None:
    """Stream ``url`` into ``target`` atomically (a partial file never looks complete, and
    concurrent jobs fetching the same file each write their own temporary)."""
    import requests


    with requests.get(url, stream=True, timeout=TEMPLATEFLOW_TIMEOUT) as response:
        if response.status_code != 200:
            raise OSError(f"HTTP {response.status_code}")

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as handle:
                for chunk in response.iter_content(1 << 20):
                    handle.write(chunk)
            if Path(tmp).stat().st_size == 0:
                raise OSError("empty download")

        write_via(target, write, fsync=False)


def templateflow_file(space: str, filename: str, what: str) -> Path:
    """Return ``tpl-<space>/<filename>`` from the TemplateFlow cache, downloading it if needed.

    A non-empty cached file is used as is (TemplateFlow leaves 0-byte placeholders for
    files it has not downloaded). Otherwise the file is fetched from TemplateFlow's S3
    store, which TemplateFlow's own client would do after indexing the whole cache with
    pybids (tens of seconds; too slow to fail fast offline).
    """
    root = templateflow_home()
    cached = root / f"tpl-{space}" / filename
    if cached.is_file() and cached.stat().st_size > 0:
        return cached
    listing = _templateflow_listing()
    relative = f"tpl-{space}/{filename}"
    if listing is not None and relative not in listing:
        raise MissingInputError(
            f"{what} ({filename}) is not in the TemplateFlow cache {root} and TemplateFlow "
            f"does not provide it: check the name, or {FETCH_HINT}")
    try:
        _download(f"{TEMPLATEFLOW_S3}/{relative}", cached)
    except Exception as exc:  # requests/urllib/OSError: offline, proxy, HTTP error
        raise MissingInputError(
            f"{what} ({filename}) is not in the TemplateFlow cache {root} and could not be "
            f"downloaded ({type(exc).__name__}): {FETCH_HINT}") from exc
    return cached


def load_nifti(path: Path, what: str) -> nib.Nifti1Image:
    """Open a NIfTI image (header read, data left on disk); BadDataError names ``what``."""
    try:
        img = nib.load(str(path))
        img.header.get_data_shape()
        return img
    except Exception as exc:
        raise BadDataError(f"{what} {path} cannot be read as NIfTI ({exc})") from exc


def load_template(space: str = DEFAULT_SPACE, resolution: int = MODEL_RESOLUTION) -> Template:
    """Load the template brain mask that defines the model grid.

    Parameters
    ----------
    space : str
        TemplateFlow template identifier (``MNI152NLin2009cAsym``).
    resolution : int
        TemplateFlow resolution index (2 = 2 mm, grid 97 x 115 x 97 for the default).

    Returns
    -------
    Template
        ``mask_img`` is 3D ``(X, Y, Z)``; ``t1w_path`` is ``None`` when no T1w is
        available (it only serves figures).

    Raises
    ------
    MissingInputError
        The mask is neither cached nor downloadable.
    """
    res = f"res-{int(resolution):02d}"
    mask_path = templateflow_file(space, f"tpl-{space}_{res}_desc-brain_mask.nii.gz",
                                   f"template brain mask of {space}")
    mask_img = load_nifti(mask_path, "template brain mask")
    if len(mask_img.shape) != 3:
        raise BadDataError(f"template brain mask {mask_path} is not 3D ({mask_img.shape})")
    try:
        t1w_path: Optional[Path] = templateflow_file(
            space, f"tpl-{space}_{res}_T1w.nii.gz", f"template T1w of {space}")
    except MissingInputError as exc:  # only figures need it
        log.warning("%s", exc)
        t1w_path = None
    return Template(space=space, resolution=int(resolution), mask_img=mask_img,
                    mask_path=mask_path, t1w_path=t1w_path)
