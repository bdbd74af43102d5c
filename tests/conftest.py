"""Shared fixtures: synthetic template/atlas caches and a small generated dataset.

``resources``
    Synthetic TemplateFlow and nilearn caches (grid 13 x 17 x 11, 2 mm, non-centred origin;
    an AAL3-like atlas of 29 regions on its own LAS grid) laid out where the libraries look,
    with ``TEMPLATEFLOW_HOME``, ``TEMPLATEFLOW_AUTOUPDATE=0`` and ``NILEARN_DATA`` set for
    the whole test session (subprocesses inherit them), so the app's real fetch code finds
    them without network.
``small_dataset``
    ``make_dataset`` on that grid: 6 subjects (3 ADHD, 3 controls, 2 sites), 40 frames,
    TR 2 s. It behaves as the BIDS root path (``Path(small_dataset)``, ``small_dataset /
    "participants.tsv"``) and as the manifest dict (``small_dataset["adhd_subjects"]``);
    ``.root``, ``.fmriprep_dir`` and ``.manifest`` too. Shared by the session: treat it as
    read-only (copy it to ``tmp_path`` to modify it).
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

# Small BLAS calls (numpy/scipy) ran ~30x slower on 2 busy threads than on one here; tests
# run 2 workers on 2 cores. torch threads are left to each test.
for _var in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")
try:
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=1, user_api="blas")
except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn
    pass

SMALL_SHAPE = (13, 17, 11)


@pytest.fixture(autouse=True)
def _sigterm_handler_restored():
    """Put back the test process's SIGTERM handler that an in-process CLI run replaces."""
    previous = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, previous)


@dataclass(frozen=True)
class SyntheticResources:
    """Where the synthetic caches are and what grid they define."""

    templateflow_home: Path
    nilearn_data: Path
    shape: tuple
    affine: np.ndarray
    space: str = "MNI152NLin2009cAsym"


class SmallDataset(dict):
    """The manifest of a generated dataset that also acts as its BIDS root path."""

    @property
    def root(self) -> Path:
        return Path(self["bids_dir"])

    @property
    def bids_dir(self) -> Path:
        return self.root

    @property
    def fmriprep_dir(self) -> Path:
        return Path(self["fmriprep_dir"])

    @property
    def manifest(self) -> dict:
        return dict(self)

    def __fspath__(self) -> str:
        return str(self.root)

    def __truediv__(self, other) -> Path:
        return self.root / other

    def __str__(self) -> str:
        return str(self.root)


@pytest.fixture(scope="session")
def resources(tmp_path_factory) -> SyntheticResources:
    """Synthetic TemplateFlow + nilearn caches, exported through the environment."""
    import nibabel as nib

    from bids_roimae.synth.resources import write_synthetic_resources

    base = tmp_path_factory.mktemp("resources")
    tf_home, nl_data = base / "templateflow", base / "nilearn_data"
    write_synthetic_resources(tf_home, nl_data, shape=SMALL_SHAPE)
    patch = pytest.MonkeyPatch()
    patch.setenv("TEMPLATEFLOW_HOME", str(tf_home))
    patch.setenv("TEMPLATEFLOW_AUTOUPDATE", "0")
    patch.setenv("NILEARN_DATA", str(nl_data))
    mask = nib.load(tf_home / "tpl-MNI152NLin2009cAsym"
                    / "tpl-MNI152NLin2009cAsym_res-02_desc-brain_mask.nii.gz")
    try:
        yield SyntheticResources(tf_home, nl_data, SMALL_SHAPE, mask.affine.copy())
    finally:
        patch.undo()


@pytest.fixture(scope="session")
def small_dataset(resources, tmp_path_factory) -> SmallDataset:
    """6 subjects (3 ADHD, 3 controls, 2 sites), 40 frames, on the ``resources`` grid."""
    from bids_roimae.synth.dataset import make_dataset

    root = tmp_path_factory.mktemp("small_dataset") / "bids"
    manifest = make_dataset(root, n_subjects=6, n_frames=40, tr=2.0, seed=0, n_sites=2)
    return SmallDataset(manifest)
