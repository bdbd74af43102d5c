"""Set-up shared by the preparation and cache-read benchmarks: the full-size model grid
and its brain mask."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

SPACE = "MNI152NLin2009cAsym"
MASK = Path("/work/shared/data/tpl-MNI152NLin2009cAsym/"
            "tpl-MNI152NLin2009cAsym_res-02_desc-brain_mask.nii.gz")
GRID = (97, 115, 97)
AFFINE = np.array([[2.0, 0, 0, -96.5], [0, 2.0, 0, -132.5], [0, 0, 2.0, -78.5], [0, 0, 0, 1]])
RESULTS = Path(__file__).parent / "results"


def template_mask() -> tuple[np.ndarray, str]:
    """The 2 mm template brain mask (an ellipsoid when the TemplateFlow file is absent).

    Returns
    -------
    mask : numpy.ndarray
        bool ``GRID``.
    source : str
        What the mask is.
    """
    if MASK.is_file():
        img = nib.load(MASK)
        return np.asanyarray(img.dataobj) > 0, "TemplateFlow res-2 brain mask"
    idx = np.indices(GRID).astype(float)
    centre = np.array([48.0, 63.0, 39.0])[:, None, None, None]
    radii = np.array([36.0, 45.0, 38.0])[:, None, None, None]
    return (((idx - centre) / radii) ** 2).sum(0) <= 1.0, "ellipsoid"
