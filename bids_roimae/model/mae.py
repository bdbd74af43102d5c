"""A 4D masked autoencoder over brain tokens (``RoiMAE``); no I/O.

Shapes (see docs/ARCHITECTURE.md): a window ``x (B, W, N, P)`` is grouped into
``T' = W // temporal_patch`` time tokens of ``F = temporal_patch * P`` features
(frame-major, as :func:`bids_roimae.core.geometry.window_tokens`). A mask ``(B, T', N)`` is
boolean, ``True`` = hidden from the encoder.

The encoder sees visible tokens only. With ``attention="divided"`` each block attends
over space within a time step, then over time per location; this needs *tube* masks
(one spatial set for every time step), so the visible tokens form a ``T' x N_vis`` grid.
Masks of the default ``exact`` count rule (random, and ROI with a partly hidden last
region) hide the same number of tokens in every sample, so attention runs unpadded with
no mask. Masks with unequal counts (ROI ``whole`` rule, region fidelity batches) are
gathered and padded to the batch maximum, and a key-padding mask keeps padded slots from
influencing real tokens. ``attention="joint"`` attends over all visible tokens at once
and accepts any mask (per-chunk masks included). The light decoder sees every token, with
a learned mask token in the hidden places. The loss is the MSE over hidden tokens,
restricted to brain voxels.

The position features and transformer blocks are in :mod:`bids_roimae.model.blocks`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from torch import nn

from bids_roimae.config import AppConfig, ConfigError, ModelConfig
from bids_roimae.model.blocks import DividedBlock, JointBlock, sincos_1d, sincos_3d

PRESETS = {
    "tiny": dict(embed_dim=64, depth=2, num_heads=4, decoder_dim=32, decoder_depth=1,
                 decoder_heads=2),
    "small": dict(embed_dim=384, depth=12, num_heads=6, decoder_dim=256, decoder_depth=4,
                  decoder_heads=8),
    "base": dict(embed_dim=768, depth=12, num_heads=12, decoder_dim=384, decoder_depth=4,
                 decoder_heads=8),
}


def resolve_model_config(model_cfg: ModelConfig) -> dict:
    """Sizes of the transformer: the preset's, with explicitly set values on top.

    Returns
    -------
    dict
        ``embed_dim, depth, num_heads, decoder_dim, decoder_depth, decoder_heads,
        mlp_ratio, attention, norm_target, dropout``.
    """
    if model_cfg.preset not in PRESETS:
        raise ConfigError(f"model.preset {model_cfg.preset!r} is unknown "
                          f"(known: {', '.join(PRESETS)})")
    sizes = dict(PRESETS[model_cfg.preset])
    for key in sizes:
        value = getattr(model_cfg, key)
        if value is not None:
            sizes[key] = int(value)
    for dim, heads in (("embed_dim", "num_heads"), ("decoder_dim", "decoder_heads")):
        if sizes[dim] % sizes[heads]:
            raise ConfigError(f"model.{dim} ({sizes[dim]}) must be a multiple of "
                              f"model.{heads} ({sizes[heads]})")
    sizes.update(mlp_ratio=float(model_cfg.mlp_ratio), attention=model_cfg.attention,
                 norm_target=bool(model_cfg.norm_target), dropout=float(model_cfg.dropout))
    return sizes


def visible_index(hidden: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Indices of visible positions, padded to the batch maximum.

    Parameters
    ----------
    hidden : bool tensor, shape (B, L)

    Returns
    -------
    index : long tensor, shape (B, L_vis)
        Visible positions first (ascending), then hidden ones as padding, so every row
        holds distinct positions.
    valid : bool tensor (B, L_vis) or None
        Which slots are real; ``None`` when every sample has the same visible count.
    """
    counts = (~hidden).sum(dim=1)
    low, high = (int(v) for v in torch.stack([counts.min(), counts.max()]).tolist())
    if low < 1:
        raise ValueError("a mask hides every token of a sample; the encoder needs one visible")
    order = torch.argsort(hidden.to(torch.int8), dim=1, stable=True)[:, :high]
    if low == high:
        return order, None
    valid = torch.arange(high, device=hidden.device)[None, :] < counts[:, None]
    return order, valid


def _hidden_rows(hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden positions of each row of ``hidden (B, L)``, padded by repeating the row's
    first one: ``rows (B, Q)`` and which of them are real ``(B, Q)``."""
    counts = hidden.sum(dim=1)
    order = torch.argsort((~hidden).to(torch.int8), dim=1, stable=True)[:, :int(counts.max())]
    real = torch.arange(order.shape[1], device=hidden.device)[None, :] < counts[:, None]
    return torch.where(real, order, order[:, :1]), real


def _visible_mean(latent: torch.Tensor, valid: Optional[torch.Tensor]) -> torch.Tensor:
    """Mean encoder output over each sample's real (not padding) visible tokens ``(B, D)``.

    ``latent`` is ``(B, T', L, D)`` (divided) or ``(B, L, D)`` (joint); ``valid (B, L)``
    marks real slots, None when no sample is padded.
    """
    dims = tuple(range(1, latent.ndim - 1))
    if valid is None:
        return latent.mean(dim=dims)
    w = valid.to(latent.dtype)
    w = (w[:, None, :, None].expand(-1, latent.shape[1], -1, 1) if latent.ndim == 4
         else w[..., None])
    return (latent * w).sum(dim=dims) / w.sum(dim=dims).clamp_min(1.0)


def _to_device(pair, device):
    return tuple(None if t is None else t.to(device, non_blocking=True) for t in pair)


@dataclass
class HiddenTokens:
    """A batch's reconstruction at each sample's hidden tokens only.

    Divided attention: ``pred`` and ``target`` are ``(B, T', Q, F)`` and ``rows (B, Q)``
    are token indices; joint attention: ``(B, Q, F)`` over the flattened ``T' * N``
    tokens, ``rows`` indexing them. ``Q`` is the largest hidden count of the batch; a
    sample that hides fewer repeats a row with ``weight`` 0.

    Attributes
    ----------
    pred, target : tensor
        Reconstruction and (normalised, if the model says so) target.
    feature_mask : bool tensor broadcasting to ``pred``
        Brain voxels of each row's features.
    weight : tensor, ``pred.shape[:-1]``
        1 for a real hidden row, 0 for padding.
    rows : long tensor, shape (B, Q)
    targets : tensor, shape (B, T', N, F)
        Every token's target (trivial predictors read the visible ones).
    """

    pred: torch.Tensor
    target: torch.Tensor
    feature_mask: torch.Tensor
    weight: torch.Tensor
    rows: torch.Tensor
    targets: torch.Tensor

    def voxel_weight(self) -> torch.Tensor:
        """``pred``-shaped weight: 1 at a real hidden row's brain voxels, else 0."""
        return self.feature_mask.to(self.pred.dtype) * self.weight[..., None]

    def loss(self) -> torch.Tensor:
        """Mean squared error over the hidden tokens' brain voxels (the training loss)."""
        voxels = self.voxel_weight()
        return ((self.pred - self.target) ** 2 * voxels).sum() / voxels.sum().clamp(min=1)


class RoiMAE(nn.Module):
    """Masked autoencoder over brain tokens.

    Parameters
    ----------
    centres_mm : array, shape (N, 3)
        Patch centres in mm (fixed spatial sin-cos embedding).
    voxel_mask : bool array, shape (N, P)
        Brain voxels of each patch (the loss only counts these).
    temporal_patch : int
        Frames per time token.
    n_time : int
        Time tokens per window ``T'`` (size of a learned time embedding).
    embed_dim, depth, num_heads, decoder_dim, decoder_depth, decoder_heads : int
    mlp_ratio : float
    attention : {"divided", "joint"}
    norm_target : bool
        Normalise each target token over its brain voxels (mean 0, variance 1).
    dropout : float
    time_embedding : {"sincos", "learned"}
    """

    def __init__(self, centres_mm, voxel_mask, temporal_patch: int, n_time: int, *,
                 embed_dim: int, depth: int, num_heads: int, decoder_dim: int,
                 decoder_depth: int, decoder_heads: int, mlp_ratio: float = 4.0,
                 attention: str = "divided", norm_target: bool = False, dropout: float = 0.0,
                 time_embedding: str = "sincos"):
        super().__init__()
        if attention not in ("divided", "joint"):
            raise ValueError(f"attention must be divided or joint, got {attention!r}")
        voxel_mask = torch.as_tensor(np.asarray(voxel_mask, bool))
        centres = np.asarray(centres_mm, np.float64)
        self.n_tokens, self.patch_voxels = voxel_mask.shape
        self.temporal_patch, self.n_time = int(temporal_patch), int(n_time)
        self.attention, self.norm_target = attention, bool(norm_target)
        self.embed_dim = embed_dim
        feat = self.temporal_patch * self.patch_voxels
        # Derived from the geometry, which checkpoints store separately: not persistent.
        self.register_buffer("feature_mask", voxel_mask.repeat(1, self.temporal_patch),
                             persistent=False)
        self.register_buffer("pos_space", torch.tensor(sincos_3d(centres, embed_dim),
                                                       dtype=torch.float32), persistent=False)
        self.register_buffer("dec_pos_space", torch.tensor(sincos_3d(centres, decoder_dim),
                                                           dtype=torch.float32), persistent=False)
        if time_embedding == "learned":
            self.pos_time = nn.Parameter(torch.zeros(n_time, embed_dim))
            self.dec_pos_time = nn.Parameter(torch.zeros(n_time, decoder_dim))
            nn.init.normal_(self.pos_time, std=0.02)
            nn.init.normal_(self.dec_pos_time, std=0.02)
        elif time_embedding == "sincos":
            self.register_buffer("pos_time",
                                 torch.tensor(sincos_1d(np.arange(n_time), embed_dim),
                                              dtype=torch.float32), persistent=False)
            self.register_buffer("dec_pos_time",
                                 torch.tensor(sincos_1d(np.arange(n_time), decoder_dim),
                                              dtype=torch.float32), persistent=False)
        else:
            raise ValueError(f"time_embedding must be sincos or learned, got {time_embedding!r}")
        block = DividedBlock if attention == "divided" else JointBlock
        self.patch_embed = nn.Linear(feat, embed_dim)
        self.blocks = nn.ModuleList(block(embed_dim, num_heads, mlp_ratio, dropout)
                                    for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim)
        self.decoder_embed = nn.Linear(embed_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(decoder_dim))
        self.decoder_blocks = nn.ModuleList(
            block(decoder_dim, decoder_heads, mlp_ratio, dropout) for _ in range(decoder_depth))
        self.decoder_norm = nn.LayerNorm(decoder_dim)
        self.decoder_pred = nn.Linear(decoder_dim, feat)
        self.apply(_init_weights)
        nn.init.normal_(self.mask_token, std=0.02)

    # -- shapes -------------------------------------------------------------------------
    def group_time(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, W, N, P)`` -> ``(B, T', N, temporal_patch * P)``, frame-major features."""
        b, w, n, p = x.shape
        if w % self.temporal_patch or (n, p) != (self.n_tokens, self.patch_voxels):
            raise ValueError(f"input {tuple(x.shape)} does not fit (B, k*{self.temporal_patch}, "
                             f"{self.n_tokens}, {self.patch_voxels})")
        t = w // self.temporal_patch
        x = x.reshape(b, t, self.temporal_patch, n, p).transpose(2, 3)
        return x.reshape(b, t, n, self.temporal_patch * p)

    def _check_mask(self, mask: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        if mask.shape != tokens.shape[:3]:
            raise ValueError(f"mask {tuple(mask.shape)} != tokens {tuple(tokens.shape[:3])}")
        # The mask may stay on the host (the train loop passes pinned CPU masks): index
        # bookkeeping then needs no GPU synchronisation; only results are copied over.
        mask = mask.to(dtype=torch.bool)
        if self.attention == "divided" and not bool((mask == mask[:, :1]).all()):
            raise ValueError("divided attention needs tube masks (one spatial set for all "
                             "time steps); use attention='joint' for per-chunk masks")
        return mask

    # -- encoder ------------------------------------------------------------------------
    def _encode(self, tokens: torch.Tensor, mask: Optional[torch.Tensor], normed: bool = True):
        """Encode visible tokens.

        Returns ``(latent, index, valid)``: divided -> latent ``(B, T', L, D)`` with
        spatial ``index (B, L)``; joint -> latent ``(B, L, D)`` with ``index (B, L)``
        over the flattened ``T' * N`` tokens. ``index`` is None when all are visible.
        ``normed=False``: the residual stream before the final norm.
        """
        b, t, n, f = tokens.shape
        pos_space, pos_time = self.pos_space, self.pos_time[:t]
        if self.attention == "divided":
            index = valid = None
            if mask is not None and bool(mask.any()):
                index, valid = _to_device(visible_index(mask[:, 0]), tokens.device)
                tokens = torch.gather(tokens, 2,
                                      index[:, None, :, None].expand(b, t, index.shape[1], f))
                pos_space = pos_space[index][:, None]  # (B, 1, L, D)
            h = self.patch_embed(tokens) + pos_space + pos_time[:, None, :]
            for blk in self.blocks:
                h = blk(h, valid)
            return (self.norm(h) if normed else h), index, valid
        flat = tokens.reshape(b, t * n, f)
        pos = (pos_time[:, None, :] + pos_space[None]).reshape(t * n, -1)
        index = valid = None
        if mask is not None and bool(mask.any()):
            index, valid = _to_device(visible_index(mask.reshape(b, t * n)), tokens.device)
            flat = torch.gather(flat, 1, index[..., None].expand(b, index.shape[1], f))
            pos = pos[index]
        h = self.patch_embed(flat) + pos
        for blk in self.blocks:
            h = blk(h, valid)
        return (self.norm(h) if normed else h), index, valid

    def _encode_occluded(self, tokens: torch.Tensor, mask: torch.Tensor):
        """:meth:`_encode` of one window ``tokens (1, T', N, F)`` under several tube masks
        ``(B, T', N)``, for divided attention: the first block's spatial attention over all
        tokens is computed once, and each mask's version follows from it by taking the
        hidden keys out (:meth:`DividedBlock.forward_without`); the later blocks run on
        each mask's visible tokens as usual. Same numbers as :meth:`_encode` of the
        repeated window."""
        b, t = mask.shape[:2]
        index, valid = _to_device(visible_index(mask[:, 0]), tokens.device)
        h0 = self.patch_embed(tokens) + self.pos_space + self.pos_time[:t, None, :]
        first = self.blocks[0]
        parts = first.space_parts(h0)
        spatial = mask[:, 0].to(tokens.device)
        h = h0.new_zeros(b, t, index.shape[1], h0.shape[-1])
        for i in range(b):
            n_kept = index.shape[1] if valid is None else int(valid[i].sum())
            removed = torch.nonzero(spatial[i]).flatten()
            h[i, :, :n_kept] = first.forward_without(h0, parts, removed, index[i, :n_kept])[0]
        for blk in self.blocks[1:]:
            h = blk(h, valid)
        return self.norm(h), index, valid

    # -- decoder ------------------------------------------------------------------------
    def _decoder_input(self, latent, index, valid, b: int, t: int) -> torch.Tensor:
        """Decoder tokens with positions: ``(B, T', N, Dd)`` (divided) or ``(B, T'*N, Dd)``
        (joint); hidden places hold the mask token."""
        n = self.n_tokens
        d = self.decoder_embed(latent)
        dd = d.shape[-1]
        token = self.mask_token.to(d.dtype)
        if valid is not None:  # padded slots carry the mask token, so scattering them is a no-op
            shape = ((b, 1, valid.shape[1], 1) if self.attention == "divided"
                     else (b, valid.shape[1], 1))
            d = torch.where(valid.reshape(shape), d, token)
        if self.attention == "divided":
            if index is not None:
                full = token.expand(b, t, n, dd)
                d = full.scatter(2, index[:, None, :, None].expand(b, t, index.shape[1], dd), d)
            return d + self.dec_pos_space + self.dec_pos_time[:t, None, :]
        if index is not None:
            full = token.expand(b, t * n, dd)
            d = full.scatter(1, index[..., None].expand(b, index.shape[1], dd), d)
        pos = (self.dec_pos_time[:t, None, :] + self.dec_pos_space[None]).reshape(t * n, dd)
        return d + pos

    def _decode(self, latent, index, valid, b: int, t: int) -> torch.Tensor:
        h = self._decoder_input(latent, index, valid, b, t)
        for blk in self.decoder_blocks:
            h = blk(h)
        if self.attention == "joint":
            h = h.reshape(b, t, self.n_tokens, -1)
        return self.decoder_pred(self.decoder_norm(h))

    # -- targets and loss ---------------------------------------------------------------
    def targets(self, tokens: torch.Tensor) -> torch.Tensor:
        """Reconstruction targets ``(B, T', N, F)`` (per-token normalised if asked)."""
        tokens = tokens.float()
        if not self.norm_target:
            return tokens
        fm = self.feature_mask.to(tokens.dtype)
        count = fm.sum(-1, keepdim=True)
        mean = (tokens * fm).sum(-1, keepdim=True) / count
        var = (((tokens - mean) * fm) ** 2).sum(-1, keepdim=True) / count
        return (tokens - mean) / torch.sqrt(var + 1e-6) * fm

    def _squared_error(self, pred, target) -> torch.Tensor:
        return (pred.float() - target) ** 2 * self.feature_mask

    def _reconstruct(self, x: torch.Tensor, mask: torch.Tensor):
        """Encode, decode and score: ``(mask, latent, valid, pred, err)``, ``err`` the
        squared error per brain voxel ``(B, T', N, F)``."""
        tokens = self.group_time(x)
        mask = self._check_mask(mask, tokens)
        b, t = tokens.shape[:2]
        latent, index, valid = self._encode(tokens, mask)
        pred = self._decode(latent, index, valid, b, t)
        return mask, latent, valid, pred, self._squared_error(pred, self.targets(tokens))

    def forward(self, x: torch.Tensor, mask: torch.Tensor, return_pred: bool = True
                ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Reconstruct hidden tokens.

        Parameters
        ----------
        x : float tensor, shape (B, W, N, P)
        mask : bool tensor, shape (B, T', N); True = hidden
        return_pred : bool
            False (training): the decoder's last block and the prediction head run at the
            hidden tokens only, the only ones the loss counts; same loss, less work at
            voxel resolution.

        Returns
        -------
        loss : scalar tensor
            Mean squared error over hidden tokens' brain voxels.
        pred : tensor, shape (B, T', N, temporal_patch * P), or None
            Reconstruction of every token (only hidden ones are trained).
        """
        if not return_pred:
            return self.hidden_tokens(x, mask).loss(), None
        mask, latent, valid, pred, err = self._reconstruct(x, mask)
        weight = mask.to(err.device, non_blocking=True)[..., None] & self.feature_mask
        loss = (err * weight).sum() / weight.sum().clamp(min=1)
        return loss, pred

    def hidden_tokens(self, x: torch.Tensor, mask: torch.Tensor) -> HiddenTokens:
        """Encode ``x (B, W, N, P)`` under ``mask (B, T', N)`` and decode the hidden
        tokens only (the loss and validation scores need nothing else)."""
        tokens = self.group_time(x)
        mask = self._check_mask(mask, tokens)
        latent, index, valid = self._encode(tokens, mask)
        return self._decode_hidden(tokens, mask, latent, index, valid)

    def _decode_hidden(self, tokens, mask, latent, index, valid) -> HiddenTokens:
        """The hidden tokens' reconstruction, decoded there only: every token still serves
        the decoder as key and value; its last block and the prediction head run at the
        hidden rows."""
        b, t, n, f = tokens.shape
        h = self._decoder_input(latent, index, valid, b, t)
        for blk in self.decoder_blocks[:-1]:
            h = blk(h)
        hidden = mask[:, 0] if self.attention == "divided" else mask.reshape(b, t * n)
        rows, row_valid = _to_device(_hidden_rows(hidden), tokens.device)
        h = self.decoder_blocks[-1].forward_at(h, rows)
        pred = self.decoder_pred(self.decoder_norm(h)).float()
        targets = self.targets(tokens)
        if self.attention == "divided":  # pred (B, T', Q, F)
            target = torch.gather(targets, 2,
                                  rows[:, None, :, None].expand(b, t, rows.shape[1], f))
            fm = self.feature_mask[rows][:, None]  # (B, 1, Q, F)
            weight = row_valid[:, None, :].to(pred.dtype).expand(b, t, rows.shape[1])
        else:  # pred (B, Q, F) over the flattened T' * N tokens
            target = torch.gather(targets.reshape(b, t * n, f), 1,
                                  rows[..., None].expand(b, rows.shape[1], f))
            fm = self.feature_mask[rows % n]
            weight = row_valid.to(pred.dtype)
        return HiddenTokens(pred, target, fm, weight, rows, targets)

    def encode(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None, *,
               normed: bool = True) -> torch.Tensor:
        """Encoder output, ``(B, T', N, D)``: after the final norm, or with ``normed=False``
        the residual stream before it (each token keeps its scale there, so how strongly a
        region fluctuates survives; the norm sets every token to unit variance).

        With ``mask`` None every token is visible (fine-tuning, embeddings); with a mask,
        hidden positions hold zeros.
        """
        tokens = self.group_time(x)
        b, t, n, _ = tokens.shape
        if mask is not None:
            mask = self._check_mask(mask, tokens)
        latent, index, valid = self._encode(tokens, mask, normed)
        if index is None:
            return latent.reshape(b, t, n, -1)
        d = latent.shape[-1]
        if valid is not None:
            shape = ((b, 1, valid.shape[1], 1) if self.attention == "divided"
                     else (b, valid.shape[1], 1))
            latent = latent * valid.reshape(shape)
        zeros = latent.new_zeros(b, t, n, d)
        if self.attention == "divided":
            return zeros.scatter(2, index[:, None, :, None].expand(b, t, index.shape[1], d), latent)
        return zeros.reshape(b, t * n, d).scatter(
            1, index[..., None].expand(b, index.shape[1], d), latent).reshape(b, t, n, d)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled embedding ``(B, D)``: encoder output mean over all tokens."""
        return self.encode(x).mean(dim=(1, 2))

    def errors_and_embedding(self, x: torch.Tensor, mask: torch.Tensor
                             ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token MSE ``(B, T', N)`` (as :meth:`token_errors`) and the mean encoder
        output over visible tokens ``(B, D)``, from a single encoder pass (region fidelity
        needs both for every masked region)."""
        _, latent, valid, _, err = self._reconstruct(x, mask)
        err = err.sum(-1) / self.feature_mask.sum(-1)
        return err, _visible_mean(latent, valid)

    def token_errors(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Per-token MSE over brain voxels, ``(B, T', N)``, for every token.

        Meaningful for the hidden ones (visible tokens are not trained to be rebuilt).
        """
        return self.errors_and_embedding(x, mask)[0]

    def hidden_error_and_embedding(self, x: torch.Tensor, mask: torch.Tensor
                                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean per-token MSE over each sample's hidden tokens ``(B,)`` and the mean encoder
        output over its visible tokens ``(B, D)``.

        ``x`` is ``(B, W, N, P)``, or one window ``(1, W, N, P)`` under all ``B`` masks:
        with divided attention the first block's spatial attention is then shared by
        every mask (only the hidden keys' share is taken out per mask).

        The same numbers as averaging :meth:`errors_and_embedding`'s errors over the hidden
        tokens, but the decoder's last block and the prediction head run at the hidden
        tokens only (every token still serves as key and value), which is most of the
        decoder's work when few tokens are hidden (region fidelity).
        """
        tokens = self.group_time(x)
        one_window = tokens.shape[0] == 1 and mask.shape[0] > 1
        if one_window:  # one window under several masks
            tokens = tokens.expand(mask.shape[0], -1, -1, -1)
        mask = self._check_mask(mask, tokens)
        if not bool(mask.any(dim=tuple(range(1, mask.ndim))).all()):
            raise ValueError("every sample needs at least one hidden token")
        if one_window and self.attention == "divided" and len(self.blocks) > 0:
            latent, index, valid = self._encode_occluded(tokens[:1], mask)
        else:
            latent, index, valid = self._encode(tokens, mask)
        hidden = self._decode_hidden(tokens, mask, latent, index, valid)
        fm, weight = hidden.feature_mask, hidden.weight
        err = ((hidden.pred - hidden.target) ** 2 * fm).sum(-1) / fm.sum(-1)
        dims = tuple(range(1, err.ndim))
        error = (err * weight).sum(dims) / weight.sum(dims)
        return error, _visible_mean(latent, valid)


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def build_model(cfg: AppConfig, geometry) -> RoiMAE:
    """The model for a configuration and token geometry.

    Parameters
    ----------
    cfg : AppConfig
        ``cfg.model`` (preset and overrides) and ``cfg.geometry`` (window, temporal patch).
    geometry : TokenGeometry

    Returns
    -------
    RoiMAE
    """
    sizes = resolve_model_config(cfg.model)
    n_time = cfg.geometry.window // cfg.geometry.temporal_patch
    return RoiMAE(geometry.centres_mm, geometry.voxel_mask, cfg.geometry.temporal_patch,
                  n_time, **sizes)


def count_parameters(model: nn.Module) -> int:
    """Trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
