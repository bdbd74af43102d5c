"""Which brain voxels and regions drive a prediction, and which regions the model needs.

Two analyses, both on the model's token layout (``N`` spatial tokens of ``P`` voxels):

Integrated Gradients (:func:`integrated_gradients`)
    attributions of the fine-tuned classifier's output to every input value of a window
    ``(W, N, P)``, aggregated over windows and frames into per-voxel maps ``(N, P)``:
    ``abs_mean`` (how much a voxel matters) and ``signed_mean`` (in which direction).
    Completeness (sum of attributions == F(x) - F(baseline)) is checked per window.

Region reconstruction fidelity (:func:`bids_roimae.analysis.fidelity.region_fidelity`)
    one atlas region at a time hidden from the pretrained masked autoencoder; it shares
    this module's helpers and lives in :mod:`bids_roimae.analysis.fidelity`.

Maps go back to voxels with :func:`token_map` (model grid) and :func:`to_source_grid` (the
source BOLD's grid and affine); :func:`region_table` summarises a map per atlas region.
Writing files is :mod:`bids_roimae.reports.run_derivatives`'s job; this module does no I/O.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Mapping, Optional, Union

import numpy as np
import pandas as pd
import torch
from torch import nn

from bids_roimae.core.geometry import TokenGeometry

#: Documented completeness tolerance: with the Gauss-Legendre rule and ``steps >= 32`` the
#: largest per-window ``|sum(attr) - (F(x) - F(b))| / |F(x) - F(b)|`` stays below this for
#: the models this app trains (tested on a tiny transformer-like stand-in). Larger values
#: mean the path integral is under-resolved: raise ``steps``.
COMPLETENESS_TOLERANCE = 0.05

BASELINES = ("zeros", "mean")


@dataclass
class IGResult:
    """Integrated Gradients of one run's windows, aggregated over windows and frames.

    Attributes
    ----------
    abs_mean : ndarray, shape (N, P)
        Mean over windows and frames of ``|attribution|`` per token voxel.
    signed_mean : ndarray, shape (N, P)
        Mean over windows and frames of the signed attribution.
    output : ndarray, shape (K,)
        ``F(x)``: the attributed output (logit of ``target``) per window.
    baseline_output : ndarray, shape (K,)
        ``F(baseline)`` per window.
    delta : ndarray, shape (K,)
        Completeness gap ``sum(attr) - (F(x) - F(baseline))`` per window (captum's
        convergence delta).
    steps, baseline, target, method : int, str, int, str
        How the integral was taken (``steps``: the most points any window needed).
    """

    abs_mean: np.ndarray
    signed_mean: np.ndarray
    output: np.ndarray
    baseline_output: np.ndarray
    delta: np.ndarray
    steps: int
    baseline: str
    target: int
    method: str

    @property
    def relative_error(self) -> np.ndarray:
        """Per-window ``|delta| / |F(x) - F(b)|``, shape (K,) (denominator floored at 1e-6)."""
        gap = np.abs(self.output - self.baseline_output)
        return np.abs(self.delta) / np.maximum(gap, 1e-6)

    @property
    def max_relative_error(self) -> float:
        """Worst window's relative completeness error."""
        return float(self.relative_error.max()) if self.delta.size else 0.0

    @property
    def within_tolerance(self) -> bool:
        """Whether every window meets :data:`COMPLETENESS_TOLERANCE`."""
        return self.max_relative_error < COMPLETENESS_TOLERANCE

    def metadata(self) -> dict:
        """Facts for a JSON sidecar."""
        return {
            "Method": "IntegratedGradients",
            "Implementation": "captum",
            "IntegrationRule": self.method,
            "Steps": int(self.steps),
            "Baseline": self.baseline,
            "Target": int(self.target),
            "NumberOfWindows": int(self.delta.size),
            "Aggregation": "mean over windows and frames",
            "CompletenessMaxRelativeError": self.max_relative_error,
            "CompletenessMeanAbsoluteDelta": float(np.abs(self.delta).mean())
            if self.delta.size else 0.0,
            "CompletenessTolerance": COMPLETENESS_TOLERANCE,
            "MeanOutput": float(self.output.mean()) if self.output.size else float("nan"),
        }


@contextlib.contextmanager
def _inference_setup(module: nn.Module) -> Iterator[None]:
    """Eval mode and no parameter gradients (only input gradients are needed), restored."""
    was_training = module.training
    flags = [(p, p.requires_grad) for p in module.parameters()]
    module.eval()
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        module.train(was_training)


def _device_of(module: nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


def _make_baseline(windows: torch.Tensor, baseline) -> torch.Tensor:
    if isinstance(baseline, torch.Tensor):
        return baseline.to(windows).expand_as(windows)
    if baseline == "zeros":  # demeaned input (both scalings): zero is every voxel's mean
        return torch.zeros_like(windows)
    if baseline == "mean":  # each voxel's window mean: attributes the dynamics only
        return windows.mean(dim=1, keepdim=True).expand_as(windows).contiguous()
    raise ValueError(f"unknown baseline {baseline!r}; expected one of {BASELINES} or a tensor")


def _select(logits: torch.Tensor, target: int) -> torch.Tensor:
    return logits[:, target]


def _batched_logits(classifier: nn.Module, x: torch.Tensor, size: int) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([classifier(x[i:i + size]) for i in range(0, x.shape[0], size)])


def integrated_gradients(classifier: nn.Module, windows: Union[torch.Tensor, np.ndarray], *,
                         steps: int = 32, baseline: Union[str, torch.Tensor] = "zeros",
                         target: Optional[int] = None, batch_size: int = 8,
                         min_steps: Optional[int] = None,
                         method: str = "gausslegendre") -> IGResult:
    """Integrated Gradients of a classifier over a run's windows.

    Parameters
    ----------
    classifier : nn.Module
        Maps ``(B, W, N, P)`` to logits ``(B, C)``.
    windows : tensor or ndarray, shape (K, W, N, P)
        The run's windows (model-ready tokens).
    steps : int
        Integration points of the path integral (>= 2); with ``min_steps``, the most used.
    baseline : {"zeros", "mean"} or tensor broadcastable to (K, W, N, P)
        ``zeros`` is every voxel's run mean (prepared data are demeaned); ``mean`` keeps
        each voxel's window mean, so only the dynamics are attributed.
    target : int, optional
        Output column to attribute. Default: 0 when ``C == 1`` (the logit), otherwise the
        class predicted from the mean logits over windows.
    batch_size : int
        Window-steps evaluated per forward/backward pass (captum's
        ``internal_batch_size``); windows are processed in chunks of at most this many.
        Memory grows with it: the ``tiny`` preset at 1,486 tokens x 216 voxels x 20
        frames and 8 windows peaked at 3.9 GB resident with 16.
    min_steps : int, optional
        Adaptive integration: start every chunk of windows with this many points and
        double them (up to ``steps``) while a window's completeness error exceeds
        :data:`COMPLETENESS_TOLERANCE`, the check the IG authors recommend. Gauss-Legendre
        converges fast on these smooth models, so this usually costs ``min_steps``
        evaluations instead of ``steps``. ``None`` always uses ``steps``.
    method : str
        Captum's integration rule.

    Returns
    -------
    IGResult
        ``abs_mean``/``signed_mean`` (N, P) and the per-window completeness check; the
        completeness gap is captum's convergence delta, ``sum(attr) - (F(x) - F(b))``,
        computed from one forward pass at each end of the path.
    """
    from captum.attr import IntegratedGradients

    if steps < 2 or batch_size < 1 or (min_steps is not None and min_steps < 2):
        raise ValueError("steps and min_steps must be >= 2, batch_size >= 1")
    device = _device_of(classifier)
    x_all = torch.as_tensor(np.asarray(windows) if not isinstance(windows, torch.Tensor)
                            else windows).to(device=device, dtype=torch.float32)
    if x_all.ndim != 4:
        raise ValueError(f"windows must be (K, W, N, P), got {tuple(x_all.shape)}")
    n_windows = x_all.shape[0]
    chunk = max(1, min(n_windows, batch_size))
    abs_sum = torch.zeros(x_all.shape[2:], dtype=torch.float64, device=device)
    signed_sum = torch.zeros_like(abs_sum)
    base_outputs, deltas, used = [], [], []
    with _inference_setup(classifier):
        logits = _batched_logits(classifier, x_all, chunk)
        if target is None:
            target = 0 if logits.shape[1] == 1 else int(logits.mean(0).argmax())
        target = int(target)
        outputs = logits[:, target].double().cpu()
        explainer = IntegratedGradients(lambda inp: _select(classifier(inp), target))
        for start in range(0, n_windows, chunk):
            x = x_all[start:start + chunk]
            base = _make_baseline(x, baseline)
            f_base = _select(_batched_logits(classifier, base, chunk), target).double().cpu()
            gap = outputs[start:start + chunk] - f_base
            n_steps = steps if min_steps is None else min(min_steps, steps)
            while True:
                attr = explainer.attribute(x, baselines=base, n_steps=n_steps, method=method,
                                           internal_batch_size=batch_size)
                delta = attr.sum(dim=(1, 2, 3), dtype=torch.float64).cpu() - gap
                rel = delta.abs() / gap.abs().clamp_min(1e-6)
                if n_steps >= steps or float(rel.max()) < COMPLETENESS_TOLERANCE:
                    break
                n_steps = min(2 * n_steps, steps)
            abs_sum += attr.abs().sum(dim=(0, 1), dtype=torch.float64)
            signed_sum += attr.sum(dim=(0, 1), dtype=torch.float64)
            base_outputs.append(f_base)
            deltas.append(delta)
            used.append(n_steps)
    denom = float(n_windows * x_all.shape[1])
    return IGResult(
        abs_mean=(abs_sum / denom).float().cpu().numpy(),
        signed_mean=(signed_sum / denom).float().cpu().numpy(),
        output=outputs.numpy(), baseline_output=torch.cat(base_outputs).numpy(),
        delta=torch.cat(deltas).numpy(), steps=int(max(used)),
        baseline=baseline if isinstance(baseline, str) else "custom",
        target=target, method=method)


# -- maps ------------------------------------------------------------------------------
def token_map(geometry: TokenGeometry, values: np.ndarray, fill: float = 0.0):
    """Paint per-token ``(N,)`` or per-voxel ``(N, P)`` values onto the model grid.

    Returns
    -------
    nibabel.Nifti1Image
        3D float32 image with the geometry's grid shape and affine.
    """
    import nibabel as nib

    data = geometry.scatter(values, fill=fill)
    return nib.Nifti1Image(data.astype(np.float32), np.asarray(geometry.affine, float))


def _same_grid(shape_a, affine_a, shape_b, affine_b) -> bool:
    return (tuple(shape_a[:3]) == tuple(shape_b[:3])
            and np.allclose(affine_a, affine_b, atol=1e-4))


def to_source_grid(img, reference, interpolation: str = "linear"):
    """Put a 3D model-grid map on the source BOLD's grid and affine.

    Parameters
    ----------
    img : nibabel.Nifti1Image
        3D map on the model grid.
    reference : nibabel image or path
        The run's BOLD (3D or 4D; only its header is read) or its reference image.
    interpolation : {"linear", "continuous", "nearest"}
        ``linear`` keeps a non-negative map non-negative (splines overshoot).

    Returns
    -------
    nibabel.Nifti1Image
        Shape ``reference.shape[:3]`` and exactly ``reference.affine``; the data are
        unchanged when the grids already agree.
    """
    import nibabel as nib

    ref = nib.load(str(reference)) if not hasattr(reference, "affine") else reference
    ref_shape, ref_affine = tuple(ref.shape[:3]), np.asarray(ref.affine, float)
    if _same_grid(img.shape, img.affine, ref_shape, ref_affine):
        data = np.asarray(img.dataobj, dtype=np.float32)
    else:
        from nilearn.image import resample_img

        out = resample_img(img, target_affine=ref_affine, target_shape=ref_shape,
                           interpolation=interpolation, force_resample=True,
                           copy_header=True)
        data = np.asarray(out.dataobj, dtype=np.float32)
    return nib.Nifti1Image(data, ref_affine)


# -- region summaries ------------------------------------------------------------------
def _table_ids(table: pd.DataFrame) -> np.ndarray:
    col = table["index"] if "index" in table.columns else table.index.to_series()
    return np.asarray(col, dtype=np.int64)


def region_table(values: np.ndarray, labels: np.ndarray, table: pd.DataFrame, *,
                 signed_values: Optional[np.ndarray] = None,
                 mask: Optional[np.ndarray] = None) -> pd.DataFrame:
    """Summarise a voxel map per atlas region.

    Parameters
    ----------
    values : ndarray
        Attribution magnitudes, either a 3D map ``(X, Y, Z)`` or tokens ``(N, P)``;
        ``|values|`` is averaged.
    labels : ndarray of int, same shape as ``values``
        Atlas label of each voxel (0 = unlabelled), e.g. ``geometry.labels`` for tokens
        or the atlas resampled onto the map's grid.
    table : DataFrame
        Atlas table with columns ``index``, ``name`` and optionally ``system``.
    signed_values : ndarray, same shape, optional
        Signed map for ``signed_mean`` (default: ``values``).
    mask : ndarray of bool, same shape, optional
        Voxels to count (e.g. ``geometry.voxel_mask``); default every labelled voxel.

    Returns
    -------
    DataFrame
        One row per atlas region (plus any label on the grid that the table lacks) with
        ``index, name, system, mean_abs, signed_mean, n_voxels, rank``; ``rank`` 1 is the
        largest ``mean_abs`` among regions with voxels, NaN for empty regions. The sum of
        ``mean_abs * n_voxels`` equals the sum of ``|values|`` over counted voxels.
    """
    values = np.asarray(values, dtype=np.float64)
    labels = np.asarray(labels)
    if labels.shape != values.shape:
        raise ValueError(f"labels {labels.shape} and values {values.shape} differ in shape")
    signed = values if signed_values is None else np.asarray(signed_values, np.float64)
    keep = labels > 0
    if mask is not None:
        keep &= np.asarray(mask, bool)
    lab = labels[keep].astype(np.int64)
    ids = _table_ids(table)
    extra = np.setdiff1d(np.unique(lab), ids)
    all_ids = np.concatenate([ids, extra])
    size = int(all_ids.max()) + 1 if all_ids.size else 1
    counts = np.bincount(lab, minlength=size).astype(np.int64)
    abs_sums = np.bincount(lab, weights=np.abs(values[keep]), minlength=size)
    signed_sums = np.bincount(lab, weights=signed[keep], minlength=size)
    n = counts[all_ids]
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_abs = np.where(n > 0, abs_sums[all_ids] / np.maximum(n, 1), np.nan)
        signed_mean = np.where(n > 0, signed_sums[all_ids] / np.maximum(n, 1), np.nan)
    meta = table.set_index(pd.Index(ids, name="index"))
    names = [str(meta["name"].get(i, f"label-{i}")) if "name" in meta else f"label-{i}"
             for i in all_ids]
    systems = [str(meta["system"].get(i, "unknown")) if "system" in meta else "unknown"
               for i in all_ids]
    out = pd.DataFrame({"index": all_ids, "name": names, "system": systems,
                        "mean_abs": mean_abs, "signed_mean": signed_mean, "n_voxels": n})
    out["rank"] = out["mean_abs"].rank(ascending=False, method="min").astype("Int64")
    return out


def region_values(geometry: TokenGeometry, scores: Mapping[int, float]) -> np.ndarray:
    """Per-voxel ``(N, P)`` array painting every labelled voxel with its region's score.

    Voxels of regions without a score (and unlabelled voxels) are 0.
    """
    return paint_regions(geometry.labels, geometry.voxel_mask, scores)


def paint_regions(labels: np.ndarray, mask: np.ndarray, scores: Mapping[int, float]
                  ) -> np.ndarray:
    """float32 array of ``labels``' shape: each voxel inside ``mask`` holds its region's
    score; regions without a finite score, unlabelled voxels and voxels outside are 0."""
    lut_size = int(max([int(labels.max())] + [int(k) for k in scores])) + 1
    lut = np.zeros(lut_size, np.float32)
    for region, score in scores.items():
        if np.isfinite(score):
            lut[int(region)] = score
    return np.where(mask, lut[np.clip(labels, 0, None)], 0.0).astype(np.float32)


__all__ = ["BASELINES", "COMPLETENESS_TOLERANCE", "IGResult", "integrated_gradients",
           "paint_regions", "region_table", "region_values", "to_source_grid",
           "token_map"]
