"""Region reconstruction fidelity: how predictable each atlas region is from the rest.

The pretrained masked autoencoder reconstructs one atlas region at a time (all of its
patches hidden through the window, a tube); the region's reconstruction error and how far
hiding it moves the pooled encoder embedding say how predictable the region is from the
rest of the brain and how much the representation relies on it. No I/O.
"""

from __future__ import annotations

from typing import Optional, Protocol, Sequence, Union

import numpy as np
import pandas as pd
import torch

from bids_roimae.analysis.inference import device_of, frozen
from bids_roimae.analysis.regions import region_ids
from bids_roimae.core.geometry import TokenGeometry


class ReconstructionModel(Protocol):
    """What region fidelity needs of a masked autoencoder (:class:`RoiMAE` has it)."""

    def errors_and_embedding(self, x: torch.Tensor, mask: torch.Tensor
                             ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token reconstruction MSE ``(B, T', N)`` and the mean encoder output over
        the tokens ``mask`` leaves visible ``(B, D)``, for windows ``x (B, W, N, P)``."""

    def group_time(self, x: torch.Tensor) -> torch.Tensor:
        """Windows ``(B, W, N, P)`` as tokens ``(B, T', N, temporal_patch * P)``."""


def region_fidelity(mae: ReconstructionModel, windows: Union[torch.Tensor, np.ndarray],
                    geometry: TokenGeometry, *, regions: Optional[Sequence[int]] = None,
                    table: Optional[pd.DataFrame] = None, batch_size: int = 8
                    ) -> pd.DataFrame:
    """Reconstruction error and embedding shift when one region at a time is hidden.

    For every (window, region) pair the region's patches are masked through the whole
    window (a tube); pairs are evaluated ``batch_size`` at a time.

    Parameters
    ----------
    mae : ReconstructionModel
        Pretrained masked autoencoder (an ``nn.Module`` with ``errors_and_embedding``
        and ``group_time``).
    windows : tensor or ndarray, shape (K, W, N, P)
    geometry : TokenGeometry
        The model's geometry; regions come from ``geometry.region_patches()``.
    regions : sequence of int, optional
        Region labels to test (default: every region owning a patch).
    table : DataFrame, optional
        Atlas table; adds ``name`` and ``system``.
    batch_size : int
        (window, region) pairs per forward pass.

    Returns
    -------
    DataFrame
        Per region: ``index, n_tokens, error, error_sd, error_relative, embedding_shift,
        embedding_shift_sd, relative_shift, embedding_cosine, rank, error_rank`` (means
        and SDs over windows; ``error_relative`` is the error over the window's mean error
        of all tested regions; ``rank`` 1 = largest embedding shift, ``error_rank`` 1 =
        largest error), plus ``name, system`` with ``table``.
    """
    owned = geometry.region_patches()
    regions = sorted(owned) if regions is None else [int(r) for r in regions]
    missing = [r for r in regions if r not in owned]
    if missing:
        raise ValueError(f"regions own no patch in this geometry: {missing[:10]}")
    device = device_of(mae)
    x_all = torch.as_tensor(np.asarray(windows) if not isinstance(windows, torch.Tensor)
                            else windows).to(device=device, dtype=torch.float32)
    n_windows, n_tok = x_all.shape[0], x_all.shape[2]
    errors = np.zeros((n_windows, len(regions)))
    shifts = np.zeros_like(errors)
    cosines = np.zeros_like(errors)
    ref_norm = np.zeros(n_windows)
    # Batches hold pairs whose regions own the same number of tokens: every sample then
    # has the same visible count, so the encoder runs without padding or attention masks
    # (a padded batch takes a much slower attention path on CPUs).
    sizes = [int(owned[r].size) for r in regions]
    pairs = sorted(((k, j) for k in range(n_windows) for j in range(len(regions))),
                   key=lambda kj: (sizes[kj[1]], kj[1], kj[0]))
    batches, current = [], []
    for pair in pairs:
        if current and (len(current) == batch_size
                        or sizes[current[0][1]] != sizes[pair[1]]):
            batches.append(current)
            current = []
        current.append(pair)
    if current:
        batches.append(current)
    with frozen(mae), torch.inference_mode():
        t_prime = mae.group_time(x_all[:1]).shape[1]
        none_masked = torch.zeros((1, t_prime, n_tok), dtype=torch.bool, device=device)
        reference = torch.cat([mae.errors_and_embedding(x_all[k:k + 1], none_masked)[1]
                               for k in range(n_windows)])  # (K, D)
        ref_norm[:] = reference.norm(dim=1).double().cpu().numpy()
        for batch in batches:
            ks = torch.tensor([k for k, _ in batch], device=device)
            mask = torch.zeros((len(batch), t_prime, n_tok), dtype=torch.bool, device=device)
            for row, (_, j) in enumerate(batch):
                mask[row, :, torch.as_tensor(owned[regions[j]], device=device)] = True
            x = x_all[ks]
            tok_err, emb = mae.errors_and_embedding(x, mask)  # (B, T', N), (B, D)
            region_err = (tok_err * mask).sum(dim=(1, 2)) / mask.sum(dim=(1, 2))
            ref = reference[ks]
            shift = (emb - ref).norm(dim=1)
            cos = torch.nn.functional.cosine_similarity(emb, ref, dim=1)
            for row, (k, j) in enumerate(batch):
                errors[k, j] = float(region_err[row])
                shifts[k, j] = float(shift[row])
                cosines[k, j] = float(cos[row])
    ddof = 1 if n_windows > 1 else 0
    out = pd.DataFrame({
        "index": np.asarray(regions, np.int64),
        "n_tokens": sizes,
        "error": errors.mean(0), "error_sd": errors.std(0, ddof=ddof),
        # Relative to the window's mean over regions: what is specific to the region, not
        # how predictable the whole window is (motion, global signal, a short run).
        "error_relative": (errors / np.maximum(errors.mean(1, keepdims=True), 1e-12)).mean(0),
        "embedding_shift": shifts.mean(0), "embedding_shift_sd": shifts.std(0, ddof=ddof),
        "relative_shift": (shifts / np.maximum(ref_norm[:, None], 1e-12)).mean(0),
        "embedding_cosine": cosines.mean(0),
    })
    out["rank"] = out["embedding_shift"].rank(ascending=False, method="min").astype("Int64")
    out["error_rank"] = out["error"].rank(ascending=False, method="min").astype("Int64")
    if table is not None:
        meta = table.set_index(pd.Index(region_ids(table), name="index"))
        out.insert(1, "name", [str(meta["name"].get(r, f"label-{r}")) for r in regions])
        out.insert(2, "system", [str(meta["system"].get(r, "unknown"))
                                 if "system" in meta else "unknown" for r in regions])
    return out
