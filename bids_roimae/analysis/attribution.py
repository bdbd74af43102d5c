"""Integrated Gradients: which input values drive a prediction.

One of two analyses, both on the model's token layout (``N`` spatial tokens of ``P`` voxels):

Integrated Gradients (:func:`integrated_gradients`)
    attributions of the fine-tuned classifier's output to every input value of a window
    ``(W, N, P)``, aggregated over windows and frames into per-voxel maps ``(N, P)``:
    ``abs_mean`` (how much a voxel matters) and ``signed_mean`` (in which direction).
    Completeness (sum of attributions == F(x) - F(baseline)) is checked per window.

Region reconstruction fidelity (:func:`bids_roimae.analysis.fidelity.region_fidelity`)
    one atlas region at a time hidden from the pretrained masked autoencoder.

Maps go back to voxels and regions with :mod:`bids_roimae.analysis.regions`. Writing
files is :mod:`bids_roimae.reports.run_derivatives`'s job; this module does no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import numpy as np
import torch
from torch import nn

from bids_roimae.analysis.inference import device_of, frozen, items_per_pass

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
    window_abs : ndarray, shape (K, N, P)
        Per window, the mean over frames of ``|attribution|``.
    window_rms : ndarray, shape (K, N, P)
        Per window, the root mean square over frames of ``input - baseline``: the scale
        of the input that IG integrates over. ``|IG| ~ |input - baseline| x |gradient|``,
        so a region that fluctuates more gets larger attributions from any model;
        dividing by this scale (:func:`~bids_roimae.analysis.regions.scaled_region_values`)
        leaves how strongly the model responds to the region.
    output : ndarray, shape (K,)
        ``F(x)``: the attributed output (logit of ``target``) per window.
    baseline_output : ndarray, shape (K,)
        ``F(baseline)`` per window.
    delta : ndarray, shape (K,)
        Completeness gap ``sum(attr) - (F(x) - F(baseline))`` per window.
    steps, baseline, target, method : int, str, int, str
        How the integral was taken (``steps``: the most points any window needed).
    """

    abs_mean: np.ndarray
    signed_mean: np.ndarray
    window_abs: np.ndarray
    window_rms: np.ndarray
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
            "Implementation": "bids_roimae",
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


def _make_baseline(windows: torch.Tensor, baseline) -> torch.Tensor:
    if isinstance(baseline, torch.Tensor):
        return baseline.to(windows).expand_as(windows)
    if baseline == "zeros":  # demeaned input (both scalings): zero is every voxel's mean
        return torch.zeros_like(windows)
    if baseline == "mean":  # each voxel's window mean: attributes the dynamics only
        return windows.mean(dim=1, keepdim=True).expand_as(windows).contiguous()
    raise ValueError(f"unknown baseline {baseline!r}; expected one of {BASELINES} or a tensor")


#: Integration rules: the points ``alpha`` in [0, 1] along the straight path from the
#: baseline to the input, and the weight of each point's gradient.
RULES = ("gausslegendre", "riemann_left", "riemann_right", "riemann_middle",
         "riemann_trapezoid")


def path_rule(method: str, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Points and weights of an integration rule over [0, 1] with ``steps`` points.

    Gauss-Legendre is exact for polynomials of degree ``2 * steps - 1`` along the path,
    so it converges in far fewer points than the Riemann sums on smooth models.

    Returns
    -------
    alphas, weights : ndarray, shape (steps,)
        ``sum(weights) == 1``.
    """
    n = int(steps)
    if method == "gausslegendre":
        nodes, weights = np.polynomial.legendre.leggauss(n)  # on [-1, 1], weights sum to 2
        return (nodes + 1.0) / 2.0, weights / 2.0
    if method == "riemann_trapezoid":
        weights = np.full(n, 1.0 / (n - 1))
        weights[[0, -1]] /= 2.0
        return np.linspace(0.0, 1.0, n), weights
    offsets = {"riemann_left": 0.0, "riemann_middle": 0.5, "riemann_right": 1.0}
    if method not in offsets:
        raise ValueError(f"unknown integration rule {method!r}; expected one of {RULES}")
    return (np.arange(n) + offsets[method]) / n, np.full(n, 1.0 / n)


def path_integral(output, x: torch.Tensor, base: torch.Tensor, steps: int, method: str,
                  batch_size: int) -> torch.Tensor:
    """``(x - base) * sum_k w_k * grad output(base + alpha_k (x - base))``.

    Parameters
    ----------
    output : callable
        ``(B, W, N, P)`` -> ``(B,)``, the scalar attributed per item.
    x, base : tensor, shape (K, W, N, P)
    steps, method
        The integration rule (:func:`path_rule`).
    batch_size : int
        Path points per forward/backward pass (the points of one window at a time, so
        each pass broadcasts one window instead of copying it).

    Returns
    -------
    tensor, shape (K, W, N, P)
        The attributions.
    """
    alphas, weights = path_rule(method, steps)
    alphas = torch.as_tensor(alphas, dtype=x.dtype, device=x.device)
    weights = torch.as_tensor(weights, dtype=x.dtype, device=x.device)
    diff = x - base
    grad_sum = torch.zeros_like(x)
    size = max(1, int(batch_size))
    for k in range(x.shape[0]):  # the points of one window per pass: broadcast, no copies
        for start in range(0, len(alphas), size):
            alpha = alphas[start:start + size]
            points = torch.addcmul(base[k], alpha.view(-1, 1, 1, 1), diff[k])
            points.requires_grad_(True)
            (grad,) = torch.autograd.grad(output(points).sum(), points)
            grad_sum[k] += torch.tensordot(weights[start:start + size], grad, dims=1)
    return grad_sum * diff


def _batched_logits(classifier: nn.Module, x: torch.Tensor, size: int) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([classifier(x[i:i + size]) for i in range(0, x.shape[0], size)])


def ig_batch_size(classifier: nn.Module, window_shape: tuple,
                  budget_bytes: Optional[int] = None) -> int:
    """Window-steps per forward/backward pass that fit the memory budget.

    A window-step keeps, for the backward pass, its input, gradient and path copies
    (about ``6 W N P`` floats) and each encoder layer's activations (about ``24 D``
    floats per token and layer, ``N`` tokens at each of ``W / temporal_patch`` time
    steps). Measured with the ``tiny`` preset at 1,486 tokens x 216 voxels x 20 frames
    (5 time steps): 3.9 GB resident at 16 window-steps, about 240 MB each, which this
    estimate matches. Default budget:
    :func:`~bids_roimae.analysis.inference.memory_budget`.
    """
    w, n, p = (int(v) for v in window_shape[-3:])
    encoder = getattr(classifier, "encoder", classifier)
    encoder = getattr(encoder, "mae", encoder)  # the transformer behind a readout
    width = int(getattr(encoder, "embed_dim", 0) or 64)
    depth = len(getattr(encoder, "blocks", ())) or 2
    time_steps = max(1, w // int(getattr(encoder, "temporal_patch", 4) or 4))
    per_step = 4 * n * (6 * w * p + time_steps * 24 * width * depth)
    return items_per_pass(per_step, device_of(classifier), budget_bytes)


def integrated_gradients(classifier: nn.Module, windows: Union[torch.Tensor, np.ndarray], *,
                         steps: int = 32, baseline: Union[str, torch.Tensor] = "zeros",
                         target: Optional[int] = None, batch_size: int = 0,
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
        Window-steps (path points) evaluated per forward/backward pass; windows are
        processed in chunks of at most this many.
        Memory grows with it; 0 sizes it from free memory (:func:`ig_batch_size`).
    min_steps : int, optional
        Adaptive integration: start every chunk of windows with this many points and
        double them (up to ``steps``) while a window's completeness error exceeds
        :data:`COMPLETENESS_TOLERANCE`, the check the IG authors recommend. Gauss-Legendre
        converges fast on these smooth models, so this usually costs ``min_steps``
        evaluations instead of ``steps``. ``None`` always uses ``steps``.
    method : str
        Integration rule, one of :data:`RULES` (:func:`path_rule`).

    Returns
    -------
    IGResult
        ``abs_mean``/``signed_mean`` (N, P) and the per-window completeness check; the
        completeness gap (what captum calls the convergence delta), ``sum(attr) - (F(x) - F(b))``,
        computed from one forward pass at each end of the path.
    """
    if steps < 2 or batch_size < 0 or (min_steps is not None and min_steps < 2):
        raise ValueError("steps and min_steps must be >= 2, batch_size >= 0")
    device = device_of(classifier)
    x_all = torch.as_tensor(np.asarray(windows) if not isinstance(windows, torch.Tensor)
                            else windows).to(device=device, dtype=torch.float32)
    if x_all.ndim != 4:
        raise ValueError(f"windows must be (K, W, N, P), got {tuple(x_all.shape)}")
    n_windows = x_all.shape[0]
    if batch_size == 0:
        batch_size = ig_batch_size(classifier, tuple(x_all.shape))
    chunk = max(1, min(n_windows, batch_size))
    abs_sum = torch.zeros(x_all.shape[2:], dtype=torch.float64, device=device)
    signed_sum = torch.zeros_like(abs_sum)
    base_outputs, deltas, used, window_abs, window_rms = [], [], [], [], []
    with frozen(classifier):
        logits = _batched_logits(classifier, x_all, chunk)
        if target is None:
            target = 0 if logits.shape[1] == 1 else int(logits.mean(0).argmax())
        target = int(target)
        outputs = logits[:, target].double().cpu()
        def attributed(inp):
            return classifier(inp)[:, target]

        for start in range(0, n_windows, chunk):
            x = x_all[start:start + chunk]
            base = _make_baseline(x, baseline)
            f_base = _batched_logits(classifier, base, chunk)[:, target].double().cpu()
            gap = outputs[start:start + chunk] - f_base
            n_steps = steps if min_steps is None else min(min_steps, steps)
            while True:
                attr = path_integral(attributed, x, base, n_steps, method, batch_size)
                delta = attr.sum(dim=(1, 2, 3), dtype=torch.float64).cpu() - gap
                rel = delta.abs() / gap.abs().clamp_min(1e-6)
                if n_steps >= steps or float(rel.max()) < COMPLETENESS_TOLERANCE:
                    break
                n_steps = min(2 * n_steps, steps)
            abs_sum += attr.abs().sum(dim=(0, 1), dtype=torch.float64)
            window_abs.append(attr.abs().mean(dim=1).float().cpu())
            window_rms.append((x - base).square().mean(dim=1).sqrt().float().cpu())
            signed_sum += attr.sum(dim=(0, 1), dtype=torch.float64)
            base_outputs.append(f_base)
            deltas.append(delta)
            used.append(n_steps)
    denom = float(n_windows * x_all.shape[1])
    return IGResult(
        abs_mean=(abs_sum / denom).float().cpu().numpy(),
        signed_mean=(signed_sum / denom).float().cpu().numpy(),
        window_abs=torch.cat(window_abs).numpy(), window_rms=torch.cat(window_rms).numpy(),
        output=outputs.numpy(), baseline_output=torch.cat(base_outputs).numpy(),
        delta=torch.cat(deltas).numpy(), steps=int(max(used)),
        baseline=baseline if isinstance(baseline, str) else "custom",
        target=target, method=method)
