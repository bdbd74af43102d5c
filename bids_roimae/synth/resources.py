"""The example's template and atlas: real ones through the app's fetch code, else synthetic.

:func:`write_synthetic_resources` lays out a synthetic MNI152NLin2009cAsym-like template
(ellipsoid brain mask + T1w) where TemplateFlow looks and an AAL3-like atlas (real AAL3
indices and names, its own LAS grid) where nilearn looks. :func:`template_and_atlas` is
what :mod:`bids_roimae.synth.dataset` calls: the real cached resources when there are any,
otherwise synthetic ones on the real 2 mm grid written under ``OUT/sourcedata/``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np
import pandas as pd

from bids_roimae.config import DEFAULT_SPACE
from bids_roimae.errors import MissingInputError
from bids_roimae.io.atlas import aal3_systems, load_atlas
from bids_roimae.io.templates import load_template

log = logging.getLogger(__name__)

REAL_GRID = (97, 115, 97)
REAL_ORIGIN = (-96.5, -132.5, -78.5)
# Seeds of the synthetic parcellation in ellipsoid coordinates (x: right, y: anterior,
# z: superior; each in [-1, 1]); bilateral unless x == 0. Brain voxels go to the nearest.
_SEEDS = [("Frontal_Sup_2", .25, .70, .50), ("Frontal_Mid_2", .60, .55, .30),
          ("Precentral", .55, .10, .65), ("Parietal_Sup", .35, -.50, .65),
          ("Occipital_Mid", .45, -.85, .15), ("Temporal_Mid", .85, -.15, -.30),
          ("Insula", .55, .15, .00), ("Cingulate_Mid", .10, .00, .45),
          ("Hippocampus", .45, -.30, -.35), ("Amygdala", .40, .15, -.60),
          ("Thal_VL", .12, -.15, .05), ("Putamen", .30, .25, .00),
          ("Cerebellum_Crus1", .50, -.55, -.55), ("Cerebellum_6", .20, -.60, -.35),
          ("Vermis_6", .0, -.75, -.40)]


def _ellipsoid_coords(shape):
    """Normalised coordinates (X, Y, Z, 3) of every voxel in the grid's inscribed ellipsoid."""
    shape = np.asarray(shape, dtype=float)
    centre, radii = (shape - 1) / 2, 0.42 * shape
    grids = np.meshgrid(*[np.arange(n) for n in shape.astype(int)], indexing="ij")
    return np.stack([(g - c) / r for g, c, r in zip(grids, centre, radii)], axis=-1)


def _synthetic_parcellation(coords, brain):
    """Label brain voxels with the nearest seed; returns (labels (X, Y, Z), table)."""
    aal = aal3_systems().set_index("name")
    seeds, rows = [], []
    for base, x, y, z in _SEEDS:
        for side, sx in (("L", -x), ("R", x)) if x else (("", 0.0),):
            name = f"{base}_{side}" if side else base
            seeds.append((sx, y, z))
            rows.append((int(aal.loc[name, "index"]), name, aal.loc[name, "system"]))
    points = coords[brain]
    nearest, best = np.zeros(len(points), dtype=int), np.full(len(points), np.inf)
    for k, seed in enumerate(seeds):  # one seed at a time: no (V, seeds, 3) temporary
        dist = ((points - np.asarray(seed)) ** 2).sum(1)
        closer = dist < best
        nearest[closer], best[closer] = k, dist[closer]
    labels = np.zeros(brain.shape, dtype=np.int16)
    labels[brain] = np.asarray([r[0] for r in rows])[nearest]
    return labels, pd.DataFrame(rows, columns=["index", "name", "system"])


def write_synthetic_resources(templateflow_home: Path, nilearn_data: Path, *,
                              shape: Sequence[int] = (13, 17, 11),
                              space: str = DEFAULT_SPACE) -> None:
    """Write a synthetic template and AAL3-like atlas where TemplateFlow and nilearn look.

    The template (``tpl-<space>_res-02_desc-brain_mask`` ellipsoid and ``_res-02_T1w``)
    has grid ``shape`` at 2 mm; for the real shape ``(97, 115, 97)`` its origin is
    MNI152NLin2009cAsym's ``(-96.5, -132.5, -78.5)``, otherwise a non-centred one. The atlas
    (``aal_3v2/AAL3/AAL3v1.nii`` + ``AAL3v1.xml``) parcellates the ellipsoid into 29 regions
    carrying real AAL3 indices and names (limbic and cerebellar ones included); like AAL3
    it has its own grid: x flipped (LAS) and cropped by 1 voxel per side (3 on the real
    grid), aligned with the template so nearest-neighbour resampling is exact.
    """
    shape = tuple(int(n) for n in shape)
    origin = (np.asarray(REAL_ORIGIN) if shape == REAL_GRID
              else -np.asarray(shape, dtype=float) + np.array([0.5, -3.0, 1.5]))
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = origin
    coords = _ellipsoid_coords(shape)
    radius = np.sqrt((coords ** 2).sum(-1))
    brain = radius <= 1.0
    tpl_dir = Path(templateflow_home) / f"tpl-{space}"
    tpl_dir.mkdir(parents=True, exist_ok=True)
    mask = nib.Nifti1Image(brain.astype(np.uint8), affine)
    mask.set_qform(affine, 1)
    nib.save(mask, tpl_dir / f"tpl-{space}_res-02_desc-brain_mask.nii.gz")
    # T1-like contrast: bright "white matter" core, darker "grey matter" shell.
    t1w = np.where(brain, np.where(radius < 0.65, 1000, 600), 0).astype(np.int16)
    nib.save(nib.Nifti1Image(t1w, affine), tpl_dir / f"tpl-{space}_res-02_T1w.nii.gz")
    (tpl_dir / "template_description.json").write_text(json.dumps(
        {"Identifier": space, "Name": f"Synthetic stand-in for {space} (bids_roimae-synth)"},
        indent=2))

    labels, table = _synthetic_parcellation(coords, brain)
    crop = 3 if shape == REAL_GRID else 1
    atlas_data = labels[crop:shape[0] - crop, crop:shape[1] - crop, crop:shape[2] - crop][::-1]
    atlas_affine = np.diag([-2.0, 2.0, 2.0, 1.0])
    atlas_affine[:3, 3] = origin + 2.0 * np.array([shape[0] - 1 - crop, crop, crop])
    aal_dir = Path(nilearn_data) / "aal_3v2" / "AAL3"
    aal_dir.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.ascontiguousarray(atlas_data), atlas_affine),
             aal_dir / "AAL3v1.nii")
    entries = "\n".join(f"    <label><index>{i}</index><name>{n}</name></label>"
                        for i, n in zip(table["index"], table["name"]))
    (aal_dir / "AAL3v1.xml").write_text(
        '<?xml version="1.0" encoding="ISO-8859-1"?>\n<atlas version="2.0">\n'
        "  <header>\n    <name>AAL3v1 (synthetic)</name>\n  </header>\n"
        f"  <data>\n{entries}\n  </data>\n</atlas>\n")


@contextlib.contextmanager
def _environment(**values):
    """Set environment variables for the block; the old values come back after it."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update({k: str(v) for k, v in values.items()})
    try:
        yield
    finally:
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def template_and_atlas(out: Path, space: str):
    """Template + atlas through the app's fetch code, or synthetic ones written in ``out``."""
    try:
        return load_template(space), load_atlas("AAL3", space=space), {"synthetic": False}
    except MissingInputError as exc:
        tf_home, nl_data = out / "sourcedata" / "templateflow", out / "sourcedata" / "nilearn_data"
        log.warning("%s; using a synthetic template and atlas written to %s", exc,
                    out / "sourcedata")
        write_synthetic_resources(tf_home, nl_data, shape=REAL_GRID, space=space)
        with _environment(TEMPLATEFLOW_HOME=tf_home, NILEARN_DATA=nl_data,
                          TEMPLATEFLOW_AUTOUPDATE="0"):
            template, atlas = load_template(space), load_atlas("AAL3", space=space)
        return template, atlas, {"synthetic": True, "templateflow_home": str(tf_home),
                                 "nilearn_data": str(nl_data)}
