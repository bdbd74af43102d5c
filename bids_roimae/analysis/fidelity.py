"""Region reconstruction fidelity: how predictable each atlas region is from the rest.

The pretrained masked autoencoder reconstructs one atlas region at a time (all of its
tokens hidden through the window, a tube; with the geometry's ``exact`` rule exactly the
region's voxels); the region's reconstruction error and how far
hiding it moves the pooled encoder embedding say how predictable the region is from the
rest of the brain and how much the representation relies on it. No I/O.
"""

from __future__ import annotations

from typing import Optional, Protocol, Sequence, Union

import numpy as np
import pandas as pd
import torch

from bids_roimae.analysis.inference import device_of, frozen, items_per_pass
from bids_roimae.analysis.regions import region_ids
from bids_roimae.core.geometry import TokenGeometry


class ReconstructionModel(Protocol):
    """What region fidelity needs of a masked autoencoder (:class:`RoiMAE` has it)."""

    def hidden_error_and_embedding(self, x: torch.Tensor, mask: torch.Tensor
                                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean reconstruction MSE over each sample's hidden tokens ``(B,)`` and the mean
        encoder output over the tokens ``mask`` leaves visible ``(B, D)``, for windows
        ``x (B, W, N, P)``."""

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Mean encoder output with every token visible ``(B, D)``."""

    def group_time(self, x: torch.Tensor) -> torch.Tensor:
        """Windows ``(B, W, N, P)`` as tokens ``(B, T', N, temporal_patch * P)``."""


def auto_batch_size(mae, n_tokens: int, window: int, patch_voxels: int,
                    budget_bytes: Optional[int] = None) -> int:
    """(window, region) pairs per pass that fit the memory budget.

    A pair holds its window copy and its targets (``2 W N P`` floats) and, per token, the
    widest activations of an inference pass (the MLP's hidden layer, qkv): about
    ``2 mlp_ratio D`` floats at ``W / temporal_patch`` time steps, counted as ``W`` to be
    safe. Default budget: :func:`~bids_roimae.analysis.inference.memory_budget`.

    Returns
    -------
    int
        At least 1, at most 64.
    """
    width = int(getattr(mae, "embed_dim", 0) or 64)
    per_pair = 4 * window * n_tokens * (2 * patch_voxels + 8 * width)
    return items_per_pass(per_pair, device_of(mae), budget_bytes)


def region_fidelity(mae: ReconstructionModel, windows: Union[torch.Tensor, np.ndarray],
                    geometry: TokenGeometry, *, regions: Optional[Sequence[int]] = None,
                    table: Optional[pd.DataFrame] = None, batch_size: int = 0
                    ) -> pd.DataFrame:
    """Reconstruction error and embedding shift when one region at a time is hidden.

    For every (window, region) pair the region's tokens are masked through the whole
    window (a tube). A window's regions go through the model in as few passes as
    ``batch_size`` allows, sorted by size so a pass pads little;
    :meth:`~bids_roimae.model.mae.RoiMAE.hidden_error_and_embedding` shares the window's
    first attention block between them and runs the decoder's last block at the hidden
    tokens only. The numbers equal one region per pass (to float rounding).

    Parameters
    ----------
    mae : ReconstructionModel
        Pretrained masked autoencoder (an ``nn.Module``).
    windows : tensor or ndarray, shape (K, W, N, P)
    geometry : TokenGeometry
        The model's geometry; regions come from ``geometry.region_patches()`` (with the
        ``exact`` rule every region present in the brain, each exactly its own voxels).
    regions : sequence of int, optional
        Region labels to test (default: every region owning a token).
    table : DataFrame, optional
        Atlas table; adds ``name`` and ``system``.
    batch_size : int
        (window, region) pairs per forward pass; 0 sizes it from free memory
        (:func:`auto_batch_size`).

    Returns
    -------
    DataFrame
        Per region: ``index, n_tokens, n_voxels, error, error_sd, error_relative,
        embedding_shift, embedding_shift_sd, relative_shift, embedding_cosine, rank,
        error_rank`` (means and SDs over windows; ``error_relative`` is the error over
        the window's mean error of all tested regions; ``rank`` 1 = largest embedding
        shift, ``error_rank`` 1 = largest error), plus ``name, system`` with ``table``.
    """
    owned = geometry.region_patches()
    regions = sorted(owned) if regions is None else [int(r) for r in regions]
    missing = [r for r in regions if r not in owned]
    if missing:
        raise ValueError(f"regions own no token in this geometry: {missing[:10]}")
    device = device_of(mae)
    x_all = torch.as_tensor(np.asarray(windows) if not isinstance(windows, torch.Tensor)
                            else windows).to(device=device, dtype=torch.float32)
    n_windows, n_tok = x_all.shape[0], x_all.shape[2]
    if batch_size < 1:
        batch_size = auto_batch_size(mae, n_tok, x_all.shape[1], x_all.shape[3])
    errors = np.zeros((n_windows, len(regions)))
    shifts = np.zeros_like(errors)
    cosines = np.zeros_like(errors)
    sizes = [int(owned[r].size) for r in regions]
    # A pass holds one window's regions (the model shares the window's first attention
    # block between them), similar sizes side by side (it pads to its smallest region).
    by_size = sorted(range(len(regions)), key=lambda j: (sizes[j], j))
    batches = [[(k, j) for j in by_size[start:start + batch_size]]
               for k in range(n_windows) for start in range(0, len(regions), batch_size)]
    with frozen(mae), torch.inference_mode():
        t_prime = mae.group_time(x_all[:1]).shape[1]
        reference = torch.cat([mae.embed(x_all[k:k + batch_size])
                               for k in range(0, n_windows, batch_size)])  # (K, D)
        ref_norm = reference.norm(dim=1).double().cpu().numpy()
        for batch in batches:
            k = batch[0][0]
            mask = torch.zeros((len(batch), t_prime, n_tok), dtype=torch.bool, device=device)
            for row, (_, j) in enumerate(batch):
                mask[row, :, torch.as_tensor(owned[regions[j]], device=device)] = True
            region_err, emb = mae.hidden_error_and_embedding(x_all[k:k + 1], mask)
            ref = reference[k:k + 1]
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
        "n_voxels": [int(np.sum(geometry.voxel_mask & (geometry.labels == r)))
                     for r in regions],
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
