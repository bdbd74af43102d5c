"""Set-up shared by the benchmarks: the full-size model grid, its brain mask and atlas,
found the way the app finds them, and the process measurements every benchmark prints.

The template comes from the TemplateFlow cache through the app's own
:func:`bids_roimae.io.templates.load_template` (``$TEMPLATEFLOW_HOME``, downloaded into it
when online) and AAL3 from the nilearn cache through :func:`bids_roimae.io.atlas.load_atlas`
(``$NILEARN_DATA``). Offline with empty caches, the geometry is generated instead: an
ellipsoid brain on the same 97 x 115 x 97 grid and box-shaped regions. No benchmark reads
a path outside the repository or those caches.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import nibabel as nib
import numpy as np

from bids_roimae.config import DEFAULT_SPACE, MODEL_RESOLUTION
from bids_roimae.errors import AppError

SPACE = DEFAULT_SPACE
# The TemplateFlow res-2 grid of MNI152NLin2009cAsym (used when the cache is empty).
GRID = (97, 115, 97)
AFFINE = np.array([[2.0, 0, 0, -96.5], [0, 2.0, 0, -132.5], [0, 0, 2.0, -78.5], [0, 0, 0, 1]])
RESULTS = Path(__file__).resolve().parent / "results"
REGION_BOX = 12  # voxels per side of a generated region (about AAL3's region count)

log = logging.getLogger("benchmarks")


@dataclass
class BenchGrid:
    """The model grid a benchmark runs on and where it came from."""

    mask: np.ndarray  # bool (X, Y, Z) brain
    affine: np.ndarray
    labels: np.ndarray  # int32 (X, Y, Z) region labels, 0 outside regions
    mask_source: str
    labels_source: str

    @property
    def shape(self) -> tuple:
        return tuple(self.mask.shape)

    def mask_img(self) -> nib.Nifti1Image:
        return nib.Nifti1Image(self.mask.astype(np.uint8), self.affine)


def ellipsoid_mask(grid: Sequence[int] = GRID) -> np.ndarray:
    """A brain-sized ellipsoid on ``grid`` (the stand-in for an empty template cache)."""
    idx = np.indices(tuple(grid)).astype(float)
    centre = np.array([48.0, 63.0, 39.0])[:, None, None, None]
    radii = np.array([36.0, 45.0, 38.0])[:, None, None, None]
    return (((idx - centre) / radii) ** 2).sum(0) <= 1.0


def box_regions(mask: np.ndarray, box: int = REGION_BOX) -> np.ndarray:
    """Label the brain with boxes of ``box`` voxels per side (generated regions)."""
    ijk = np.indices(mask.shape) // box
    n = [s // box + 1 for s in mask.shape]
    labels = 1 + ijk[0] + n[0] * ijk[1] + n[0] * n[1] * ijk[2]
    return np.where(mask, labels, 0).astype(np.int32)


def model_grid(with_atlas: bool = True) -> BenchGrid:
    """The template brain mask (and AAL3 on its grid) from the app's caches, else generated.

    Parameters
    ----------
    with_atlas : bool
        Load AAL3 (nilearn cache); otherwise, or when it is missing, box regions.

    Returns
    -------
    BenchGrid
    """
    from bids_roimae.io.atlas import load_atlas, resample_labels
    from bids_roimae.io.templates import load_template

    try:
        template = load_template(SPACE, resolution=MODEL_RESOLUTION)
        mask = np.asanyarray(template.mask_img.dataobj) > 0
        affine, mask_source = template.mask_img.affine, f"TemplateFlow ({template.mask_path.name})"
    except AppError as exc:
        print(f"template not cached ({exc}); generating an ellipsoid brain", file=sys.stderr)
        mask, affine, mask_source = ellipsoid_mask(), AFFINE.copy(), "generated ellipsoid"
    labels, labels_source = box_regions(mask), f"generated {REGION_BOX}^3-voxel boxes"
    if with_atlas:
        try:
            atlas = load_atlas("AAL3", space=SPACE)
            labels = resample_labels(atlas, nib.Nifti1Image(mask.astype(np.uint8), affine))[0]
            labels = np.where(mask, labels, 0).astype(np.int32)
            labels_source = f"AAL3 ({atlas.source})"
        except AppError as exc:
            print(f"AAL3 not cached ({exc}); using box regions", file=sys.stderr)
    return BenchGrid(mask, np.asarray(affine, float), labels, mask_source, labels_source)


def template_mask() -> tuple[np.ndarray, str]:
    """The 2 mm template brain mask and what it is (see :func:`model_grid`)."""
    grid = model_grid(with_atlas=False)
    return grid.mask, grid.mask_source


# -- process measurements ------------------------------------------------------------------

@dataclass
class ChildRun:
    """A command run as a child process: its wall time and peak resident memory."""

    argv: list
    returncode: int
    seconds: float
    peak_rss_mb: float
    output_tail: str


def run_child(argv: Sequence[str], env: Optional[dict] = None, timeout: float = 3600
              ) -> ChildRun:
    """Run ``argv`` and measure it (``ru_maxrss`` of the largest waited-for descendant).

    Each measurement runs in its own intermediate Python process, so the peak belongs to
    this command only and not to earlier children of the benchmark.
    """
    probe = ("import json, resource, subprocess, sys, time\n"
             "t = time.perf_counter()\n"
             "p = subprocess.run(sys.argv[1:], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,"
             " text=True)\n"
             "ru = resource.getrusage(resource.RUSAGE_CHILDREN)\n"
             "print(json.dumps({'rc': p.returncode, 's': time.perf_counter() - t,"
             " 'kb': ru.ru_maxrss, 'tail': p.stdout[-3000:]}))\n")
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", probe, *map(str, argv)], env=env,
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0 or not proc.stdout.strip():
        raise RuntimeError(f"measuring {argv[:3]} failed: {proc.stderr[-2000:]}")
    rec = json.loads(proc.stdout.strip().splitlines()[-1])
    kb_unit = 1 if sys.platform != "darwin" else 1 / 1024  # ru_maxrss is bytes on macOS
    return ChildRun(list(map(str, argv)), rec["rc"], rec.get("s", time.perf_counter() - started),
                    rec["kb"] * kb_unit / 1024, rec["tail"])


def app_env(workdir: Path, grid: BenchGrid) -> dict:
    """Environment for the app run as a child: the user's caches, or (when the benchmark
    generated its grid) synthetic ones on that grid written under ``workdir``."""
    env = dict(os.environ, TEMPLATEFLOW_AUTOUPDATE="0", MPLBACKEND="Agg")
    if grid.mask_source.startswith("generated") or grid.labels_source.startswith("generated"):
        from bids_roimae.synth.resources import write_synthetic_resources

        tf, nl = workdir / "templateflow", workdir / "nilearn_data"
        write_synthetic_resources(tf, nl, shape=grid.shape)
        env.update(TEMPLATEFLOW_HOME=str(tf), NILEARN_DATA=str(nl))
    return env


def self_peak_rss_mb() -> float:
    """This process's peak resident memory so far (MB)."""
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024 if sys.platform != "darwin" else kb / 2**20


def machine() -> dict:
    """What the figures were measured on."""
    import torch

    return {"python": platform.python_version(), "machine": platform.machine(),
            "processor": platform.processor(), "cpus": os.cpu_count(),
            "torch": torch.__version__, "load_average": list(os.getloadavg())}


def write_result(name: str, record: dict) -> Path:
    """Write ``record`` to ``benchmarks/results/<name>.json``; the path."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(record, indent=1, default=str) + "\n")
    print(f"wrote {path}")
    return path
