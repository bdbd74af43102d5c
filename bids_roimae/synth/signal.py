"""Signal model of the example dataset and its fMRIPrep-style confounds table.

Per run, ``T`` frames at ``TR``:

* 10 latent network time courses: AR(1) noise convolved with a canonical double-gamma HRF
  sampled at the TR, z-scored. Each atlas system (frontal, limbic, cerebellum, ...) has a
  home network; the last network is global.
* Region ``r``: ``s_r = a_r (c n_home + g n_global + sqrt(1 - c^2 - g^2) u_r)`` with
  coupling ``c = 0.7``, ``g = 0.3``, ``u_r`` region-own HRF-smoothed noise, ``a_r = 1``.
* Voxel: ``baseline + site_scale * (10 w_v s_r + spatially smooth noise + white noise)``
  + a slow drift and motion spikes; baseline ~ 1000 x a T1-like tissue contrast plus a
  site offset, so z-scoring matters.
* Planted group difference: in ADHD subjects every planted region has amplitude
  ``a_r = 1 + 2 effect_size`` and coupling to its home network ``c (1 - effect_size)``
  (``effect="both"``), or only one of the two (``"amplitude"``, ``"coupling"``).

:class:`SignalGrid` holds what all runs share, :func:`simulate_run` draws one run and
:func:`confounds_table` derives the confounds fMRIPrep would write for it. Writing files
is :mod:`bids_roimae.synth.dataset`'s job.
"""

from __future__ import annotations

import math

import nibabel as nib
import numpy as np
import pandas as pd

SYSTEM_NETWORK = {"frontal": 0, "parietal": 1, "temporal": 2, "occipital": 3, "limbic": 4,
                  "insula": 5, "thalamus": 6, "subcortical": 7, "cerebellum": 8, "vermis": 8}
N_NETWORKS, GLOBAL_NETWORK = 10, 9
COUPLING, GLOBAL_WEIGHT = 0.7, 0.3


def hrf(tr: float, duration: float = 32.0) -> np.ndarray:
    """Canonical double-gamma HRF (peak 5 s, undershoot 15 s, ratio 1/6) every ``tr`` s.

    Parameters
    ----------
    tr : float
        Sampling interval in seconds.
    duration : float
        Length of the kernel in seconds.

    Returns
    -------
    numpy.ndarray
        The kernel, normalised to sum 1.
    """
    t = np.arange(0.0, duration, tr)

    def gamma_pdf(shape):
        return t ** (shape - 1) * np.exp(-t) / math.gamma(shape)

    h = gamma_pdf(6) - gamma_pdf(16) / 6.0
    return h / h.sum()


def slow_series(rng, n_series: int, n_frames: int, tr: float) -> np.ndarray:
    """HRF-convolved AR(1) noise, z-scored per row.

    Parameters
    ----------
    rng : numpy.random.Generator
        Source of the noise.
    n_series, n_frames : int
        Number of time courses and their length.
    tr : float
        Repetition time in seconds (sampling of the HRF).

    Returns
    -------
    numpy.ndarray
        Shape ``(n_series, n_frames)``, zero mean and unit std per row.
    """
    from scipy.signal import lfilter

    h = hrf(tr)
    noise = rng.standard_normal((n_series, n_frames + len(h)))
    series = lfilter(h, [1.0], lfilter([1.0], [1.0, -0.3], noise, axis=1), axis=1)
    series = series[:, len(h):]
    series -= series.mean(1, keepdims=True)
    return series / (series.std(1, keepdims=True) + 1e-12)


class SignalGrid:
    """Everything about the model grid that all runs share (brain voxels in F order).

    Parameters
    ----------
    template : bids_roimae.io.atlas.Template
        Grid, brain mask and (optional) T1w image giving the tissue contrast.
    labels : numpy.ndarray
        Atlas labels on the template grid.
    table : pandas.DataFrame
        Atlas table with ``index`` and ``system`` columns.
    planted : sequence of int
        Atlas indices of the regions with the planted group difference.
    rng : numpy.random.Generator
        Draws voxel loadings and the smooth noise patterns.
    """

    def __init__(self, template, labels, table, planted, rng):
        from scipy.ndimage import gaussian_filter

        self.shape = tuple(template.mask_img.shape)
        self.affine = template.mask_img.affine
        brain = np.asarray(template.mask_img.dataobj) > 0
        self.brain = brain
        self.flat = np.flatnonzero(brain.ravel(order="F"))  # F order, as NIfTI stores
        voxel_labels = labels.ravel(order="F")[self.flat]
        self.region_ids = np.unique(voxel_labels[voxel_labels > 0])
        # Region row of every brain voxel; unlabelled voxels point past the regions.
        self.region_row = np.where(voxel_labels > 0,
                                   np.searchsorted(self.region_ids, voxel_labels),
                                   self.region_ids.size)
        self.planted_rows = np.searchsorted(self.region_ids, np.asarray(planted, dtype=int))
        # Home network by system; systems of other atlases (e.g. Schaefer's "Vis") take
        # the non-global networks in turn.
        systems = dict(zip(table["index"].astype(int), table["system"].astype(str)))
        region_systems = [systems.get(int(r), "") for r in self.region_ids]
        others = sorted(set(region_systems) - set(SYSTEM_NETWORK))
        self.home = np.array([SYSTEM_NETWORK[s] if s in SYSTEM_NETWORK
                              else others.index(s) % GLOBAL_NETWORK for s in region_systems])
        n_vox = self.flat.size
        self.loading = rng.uniform(0.6, 1.0, n_vox).astype(np.float32)
        if template.t1w_path is not None:
            t1 = np.asarray(nib.load(str(template.t1w_path)).dataobj, dtype=np.float32)
            t1 = t1.ravel(order="F")[self.flat]
            t1 = np.clip(t1 / (np.percentile(t1, 99) + 1e-6), 0, 1.2)
        else:
            t1 = np.ones(n_vox, dtype=np.float32)
        self.tissue = t1.astype(np.float32)
        self.baseline = (700.0 + 500.0 * self.tissue).astype(np.float32)
        order = np.argsort(self.tissue, kind="stable")
        self.csf_rows = order[: max(n_vox // 10, 1)]       # darkest tenth
        self.wm_rows = order[-max(3 * n_vox // 10, 1):]    # brightest 30 %
        # Spatially smooth noise patterns (sigma 1.5 voxels), unit variance in the brain.
        maps = []
        for _ in range(12):
            field = gaussian_filter(rng.standard_normal(self.shape).astype(np.float32), 1.5)
            values = field.ravel(order="F")[self.flat]
            maps.append(values / (values.std() + 1e-6))
        self.noise_maps = np.stack(maps, axis=1)  # (V, 12)


EFFECTS = ("both", "amplitude", "coupling")


def planted_factors(effect: str, effect_size: float) -> tuple[float, float]:
    """Amplitude factor and coupling to the home network of a planted region in ADHD.

    Parameters
    ----------
    effect : {"both", "amplitude", "coupling"}
    effect_size : float

    Returns
    -------
    (float, float)
        ``1 + 2 effect_size`` (or 1) and ``COUPLING (1 - effect_size)`` (or ``COUPLING``).
    """
    if effect not in EFFECTS:
        raise ValueError(f"effect must be one of {', '.join(EFFECTS)}")
    amplitude = 1.0 + 2.0 * effect_size if effect in ("both", "amplitude") else 1.0
    coupling = COUPLING * (1.0 - effect_size) if effect in ("both", "coupling") else COUPLING
    return amplitude, coupling


def simulate_run(grid: SignalGrid, rng, n_frames: int, tr: float, adhd: bool,
                  effect_size: float, site_scale: float, site_offset: float,
                  effect: str = "both"):
    """Draw one run's brain-voxel time series.

    Parameters
    ----------
    grid : SignalGrid
        The shared grid.
    rng : numpy.random.Generator
        Source of this run's noise.
    n_frames : int
        Number of frames ``T``.
    tr : float
        Repetition time in seconds.
    adhd : bool
        Whether the planted effect applies.
    effect_size : float
        Planted amplitude factor ``1 + 2 effect_size``, coupling factor
        ``1 - effect_size``.
    site_scale, site_offset : float
        The site's signal scale and baseline offset.
    effect : {"both", "amplitude", "coupling"}
        Which part of the planted difference applies.

    Returns
    -------
    data : numpy.ndarray
        ``(V, T)`` float32, one row per brain voxel in F order.
    motion : numpy.ndarray
        ``(T, 6)`` translations (mm) and rotations (rad).
    """
    n_regions = grid.region_ids.size
    networks = slow_series(rng, N_NETWORKS, n_frames, tr)
    own = slow_series(rng, n_regions, n_frames, tr)
    amplitude = np.ones(n_regions)
    coupling = np.full(n_regions, COUPLING)
    planted_amplitude, planted_coupling = planted_factors(effect, effect_size)
    if adhd:
        amplitude[grid.planted_rows] = planted_amplitude
        coupling[grid.planted_rows] = planted_coupling
    unique = np.sqrt(1.0 - coupling ** 2 - GLOBAL_WEIGHT ** 2)
    region_signal = amplitude[:, None] * (coupling[:, None] * networks[grid.home]
                                          + GLOBAL_WEIGHT * networks[GLOBAL_NETWORK]
                                          + unique[:, None] * own)
    region_signal = np.vstack([region_signal, GLOBAL_WEIGHT * networks[GLOBAL_NETWORK]])
    n_vox = grid.flat.size
    data = (10.0 * grid.loading[:, None]) * region_signal.astype(np.float32)[grid.region_row]
    # 12 patterns of unit variance: per-voxel smooth-noise std 6.
    smooth = 6.0 / np.sqrt(12) * slow_series(rng, 12, n_frames, tr)
    data += grid.noise_maps @ smooth.astype(np.float32)
    data += rng.standard_normal((n_vox, n_frames), dtype=np.float32) * 5.0
    data *= site_scale
    # Head motion: random walks with one jump; large framewise displacement leaves a
    # global intensity spike (what scrubbing removes).
    trans = np.cumsum(rng.normal(0, 0.03, (n_frames, 3)), axis=0)
    rot = np.cumsum(rng.normal(0, 0.0005, (n_frames, 3)), axis=0)
    jump = rng.integers(n_frames // 3, max(n_frames // 3 + 1, n_frames - 1))
    trans[jump:] += rng.normal(0, 0.4, 3)
    motion = np.hstack([trans, rot])
    fd = np.nan_to_num(framewise_displacement(motion))
    drift = np.linspace(-0.5, 0.5, n_frames, dtype=np.float32) * rng.normal(0, 5.0)
    spikes = np.where(fd > 0.5, 10.0 * fd, 0.0).astype(np.float32)
    base = grid.baseline + site_offset
    data += base[:, None] * (1.0 + 0.001 * (drift + spikes))[None, :]
    return data, motion


def framewise_displacement(motion: np.ndarray) -> np.ndarray:
    """Power's framewise displacement (rotations on a 50 mm sphere).

    Parameters
    ----------
    motion : numpy.ndarray
        ``(T, 6)`` translations (mm) and rotations (rad).

    Returns
    -------
    numpy.ndarray
        ``(T,)`` displacement in mm; NaN for the first frame.
    """
    step = np.abs(np.diff(motion, axis=0))
    return np.r_[np.nan, step[:, :3].sum(1) + 50.0 * step[:, 3:].sum(1)]


def _derived(name: str, series: np.ndarray) -> dict:
    """fMRIPrep's expansions of a confound: derivative1, power2 and both."""
    deriv = np.r_[np.nan, np.diff(series)]
    return {name: series, f"{name}_derivative1": deriv, f"{name}_power2": series ** 2,
            f"{name}_derivative1_power2": deriv ** 2}


def _compcor(series: np.ndarray, n: int, prefix: str, mask: str):
    """Principal components of detrended rows of ``series`` (rows, T)."""
    t = np.linspace(-1, 1, series.shape[1])
    design = np.stack([np.ones_like(t), t], 1)
    resid = series.T - design @ np.linalg.lstsq(design, series.T, rcond=None)[0]
    u, s, _ = np.linalg.svd(resid, full_matrices=False)
    var = s ** 2 / (s ** 2).sum()
    cols, meta = {}, {}
    for k in range(min(n, u.shape[1])):
        name = f"{prefix}_{k:02d}"
        cols[name] = u[:, k]
        meta[name] = {"Method": prefix[0] + "CompCor", "Mask": mask, "Retained": True,
                      "SingularValue": float(s[k]), "VarianceExplained": float(var[k]),
                      "CumulativeVarianceExplained": float(var[: k + 1].sum())}
    return cols, meta


def confounds_table(grid: SignalGrid, data: np.ndarray, motion: np.ndarray, tr: float, rng):
    """A confounds table in fMRIPrep's columns and its JSON metadata.

    Parameters
    ----------
    grid : SignalGrid
        The shared grid (CSF and white-matter voxel rows).
    data : numpy.ndarray
        ``(V, T)`` brain-voxel time series of the run.
    motion : numpy.ndarray
        ``(T, 6)`` motion parameters of the run.
    tr : float
        Repetition time in seconds (cosine basis).
    rng : numpy.random.Generator
        Picks the voxels of the CompCor decompositions.

    Returns
    -------
    table : pandas.DataFrame
        One row per frame; global signal, CSF, WM, DVARS, FD, CompCor, cosines, motion
        and motion outliers.
    meta : dict
        The CompCor columns' sidecar entries.
    """
    n_frames = data.shape[1]
    cols: dict = {}
    cols.update(_derived("global_signal", data.mean(0)))
    cols.update(_derived("csf", data[grid.csf_rows].mean(0)))
    cols.update(_derived("white_matter", data[grid.wm_rows].mean(0)))
    diff = np.diff(data, axis=1)
    dvars = np.r_[np.nan, np.sqrt((diff ** 2).mean(0))]
    cols.update({"dvars": dvars, "std_dvars": dvars / np.nanmedian(dvars)})
    fd = framewise_displacement(motion)
    cols["framewise_displacement"] = fd
    cols["rmsd"] = np.r_[np.nan, np.sqrt((np.diff(motion[:, :3], axis=0) ** 2).sum(1))]
    meta: dict = {}

    def pick(rows):
        return rows[rng.choice(rows.size, min(rows.size, 2000), replace=False)]

    high_variance = np.argsort(data.var(1))[-2000:]
    for prefix, rows, mask, n in (
            ("a_comp_cor", np.r_[grid.csf_rows, grid.wm_rows], "combined", 5),
            ("c_comp_cor", grid.csf_rows, "CSF", 3), ("w_comp_cor", grid.wm_rows, "WM", 3),
            ("t_comp_cor", high_variance, "t", 3)):
        new_cols, new_meta = _compcor(data[pick(rows)].astype(np.float64), n, prefix, mask)
        cols.update(new_cols)
        meta.update(new_meta)
    # Discrete cosine basis of a 128 s high-pass filter, as fMRIPrep writes it.
    n_cos = max(1, int(np.floor(2 * n_frames * tr / 128.0)))
    frame = np.arange(n_frames)
    for k in range(1, n_cos + 1):
        cols[f"cosine{k - 1:02d}"] = np.sqrt(2.0 / n_frames) * np.cos(
            np.pi * (frame + 0.5) * k / n_frames)
    for i, name in enumerate(("trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z")):
        cols.update(_derived(name, motion[:, i]))
    outliers = np.flatnonzero((np.nan_to_num(fd) > 0.5)
                              | (np.nan_to_num(cols["std_dvars"]) > 1.5))
    for k, frame_index in enumerate(outliers):
        cols[f"motion_outlier{k:02d}"] = (frame == frame_index).astype(float)
    return pd.DataFrame(cols), meta


