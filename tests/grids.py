"""The small model grid shared by the preparation and cache tests."""

from __future__ import annotations

import nibabel as nib
import numpy as np

GRID = (13, 17, 11)
AFFINE = np.array([[2.0, 0, 0, -12.0], [0, 2.0, 0, -17.0], [0, 0, 2.0, -9.0], [0, 0, 0, 1]])
SPACE = "MNI152NLin2009cAsym"
WINDOW = 8


def ellipsoid(shape=GRID, fill=0.8) -> np.ndarray:
    """A centred ellipsoid brain mask filling ``fill`` of each axis of ``shape``."""
    idx = np.indices(shape).astype(float)
    centre = (np.asarray(shape) - 1) / 2
    radii = np.asarray(shape) / 2 * fill
    return (((idx - centre[:, None, None, None]) / radii[:, None, None, None]) ** 2
            ).sum(0) <= 1.0


def template_grid():
    """``(mask, geometry with patch size 3, template image)`` on ``GRID``."""
    from bids_roimae.core.geometry import build_geometry

    mask = ellipsoid()
    geometry = build_geometry(mask, AFFINE, None, patch_size=3)
    return mask, geometry, nib.Nifti1Image(mask.astype(np.uint8), AFFINE)
