"""Building blocks of :class:`bids_roimae.model.mae.RoiMAE`; no I/O.

Fixed sine-cosine position features (of time steps and of patch centres in mm), and the
transformer blocks: multi-head self-attention with an optional key-padding mask, the MLP,
``DividedBlock`` (space within a time step, then time per location) and ``JointBlock``
(all tokens of a sample at once). Each block's ``forward_at`` computes its output at a
few query positions only, exactly as ``forward`` would there (keys and values still span
every token): region fidelity needs the decoder's output at the hidden region alone.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


# -- positional embeddings ------------------------------------------------------------
def sincos_1d(positions: np.ndarray, dim: int, temperature: float = 10000.0) -> np.ndarray:
    """Fixed sine-cosine features of scalar positions, shape (L,) -> (L, dim), dim even."""
    half = dim // 2
    omega = 1.0 / temperature ** (np.arange(half, dtype=np.float64) / max(half, 1))
    angles = np.asarray(positions, np.float64)[:, None] * omega[None, :]
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def sincos_3d(centres_mm: np.ndarray, dim: int) -> np.ndarray:
    """Fixed features of patch centres in mm, shape (N, 3) -> (N, dim).

    Each axis gets ``2 * (dim // 6)`` channels (wavelengths ~6 mm to ~6 m, fitting a
    brain in mm); leftover channels are zero.
    """
    per_axis = 2 * (dim // 6)
    parts = [sincos_1d(centres_mm[:, a], per_axis, temperature=1000.0) for a in range(3)]
    out = np.zeros((centres_mm.shape[0], dim))
    out[:, :3 * per_axis] = np.concatenate(parts, axis=1)
    return out


# -- blocks ---------------------------------------------------------------------------
class Attention(nn.Module):
    """Multi-head self-attention over ``(M, L, D)`` with an optional key-padding mask."""

    def __init__(self, dim: int, heads: int, dropout: float = 0.0):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.dropout = dropout

    def forward(self, x: torch.Tensor, key_valid: Optional[torch.Tensor] = None) -> torch.Tensor:
        m, length, dim = x.shape
        qkv = self.qkv(x).reshape(m, length, 3, self.heads, dim // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        attn_mask = None if key_valid is None else key_valid[:, None, None, :]
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(out.transpose(1, 2).reshape(m, length, dim))

    def forward_queries(self, xq: torch.Tensor, x: torch.Tensor,
                        key_valid: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Attention of ``xq (M, Q, D)`` over ``x (M, L, D)``: what ``forward(x)`` gives at
        the query rows, with keys and values from every row of ``x``."""
        m, length, dim = x.shape
        heads, width = self.heads, dim // self.heads
        weight, bias = self.qkv.weight, self.qkv.bias
        q = F.linear(xq, weight[:dim], bias[:dim])
        kv = F.linear(x, weight[dim:], bias[dim:]).reshape(m, length, 2, heads, width)
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)
        q = q.reshape(m, xq.shape[1], heads, width).transpose(1, 2)
        attn_mask = None if key_valid is None else key_valid[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.proj(out.transpose(1, 2).reshape(m, xq.shape[1], dim))


    def softmax_parts(self, x: torch.Tensor, chunk: int = 512) -> tuple:
        """Everything :meth:`output_without` needs, from one pass over ``x (M, L, D)``:
        ``q, k, v (M, H, L, d)`` and each query's output and log-sum-exp over all keys
        (one exponential per score; the corrections are then taken in float64)."""
        m, length, dim = x.shape
        qkv = self.qkv(x).reshape(m, length, 3, self.heads, dim // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        scale = q.shape[-1] ** -0.5
        outs, lses = [], []
        for start in range(0, length, chunk):  # bounded memory: (M, H, chunk, L) scores
            scores = (q[:, :, start:start + chunk] * scale) @ k.transpose(-1, -2)
            top = scores.amax(dim=-1, keepdim=True)
            weights = torch.exp(scores - top)
            total = weights.sum(dim=-1, keepdim=True)
            outs.append((weights @ v) / total)
            lses.append((top + torch.log(total)).squeeze(-1))
        return q, k, v, torch.cat(outs, 2), torch.cat(lses, 2)

    def output_without(self, parts: tuple, removed: torch.Tensor, kept: torch.Tensor,
                       dtype: torch.dtype) -> torch.Tensor:
        """What :meth:`forward` gives at the ``kept`` rows when the ``removed`` rows are
        not in the input, ``(M, K, D)``, from :meth:`softmax_parts` of the full input.

        Softmax over the kept keys = (full output - removed keys' share) / (1 - their
        weight): ``O(L * R)`` work instead of ``O(L^2)`` for ``R`` removed rows.
        """
        q, k, v, out, lse = parts
        scale = q.shape[-1] ** -0.5
        q = q[:, :, kept].double()
        k_out, v_out = k[:, :, removed].double(), v[:, :, removed].double()
        weight = torch.exp((q @ k_out.transpose(-1, -2)) * scale
                           - lse[:, :, kept, None].double())  # (M, H, K, R)
        share = weight.sum(-1, keepdim=True)
        new = (out[:, :, kept].double() - weight @ v_out) / (1.0 - share)
        m, heads, n_kept, width = new.shape
        return self.proj(new.transpose(1, 2).reshape(m, n_kept, heads * width).to(dtype))


class Mlp(nn.Module):
    def __init__(self, dim: int, ratio: float, dropout: float = 0.0):
        super().__init__()
        hidden = int(dim * ratio)
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(F.gelu(self.fc1(x)))))


class DividedBlock(nn.Module):
    """Spatial attention per time step, temporal attention per location, then MLP.

    ``x (B, T, L, D)``; ``valid (B, L)`` marks real (not padded) locations.
    """

    def __init__(self, dim: int, heads: int, mlp_ratio: float, dropout: float = 0.0):
        super().__init__()
        self.norm_space, self.norm_time, self.norm_mlp = (nn.LayerNorm(dim) for _ in range(3))
        self.space = Attention(dim, heads, dropout)
        self.time = Attention(dim, heads, dropout)
        self.mlp = Mlp(dim, mlp_ratio, dropout)

    def forward(self, x: torch.Tensor, valid: Optional[torch.Tensor] = None) -> torch.Tensor:
        b, t, length, d = x.shape
        key_valid = (None if valid is None
                     else valid[:, None, :].expand(b, t, length).reshape(b * t, length))
        x = x + self.space(self.norm_space(x).reshape(b * t, length, d),
                           key_valid).reshape(b, t, length, d)
        xt = self.norm_time(x).transpose(1, 2).reshape(b * length, t, d)
        x = x + self.time(xt).reshape(b, length, t, d).transpose(1, 2)
        return x + self.mlp(self.norm_mlp(x))

    def space_parts(self, x: torch.Tensor) -> tuple:
        """Spatial-attention parts of one sample ``x (1, T, L, D)`` for
        :meth:`forward_without` (see :meth:`Attention.softmax_parts`)."""
        _, t, length, d = x.shape
        return self.space.softmax_parts(self.norm_space(x).reshape(t, length, d))

    def forward_without(self, x: torch.Tensor, parts: tuple, removed: torch.Tensor,
                        kept: torch.Tensor) -> torch.Tensor:
        """``forward`` of ``x (1, T, L, D)`` with the locations ``removed`` taken out,
        at the locations ``kept``: ``(1, T, K, D)``, reusing :meth:`space_parts` of the
        full ``x`` (temporal attention and the MLP act per location)."""
        _, t, _, d = x.shape
        x_at = x[:, :, kept] + self.space.output_without(parts, removed, kept,
                                                         x.dtype).reshape(1, t, -1, d)
        n_kept = x_at.shape[2]
        xt = self.norm_time(x_at).transpose(1, 2).reshape(n_kept, t, d)
        x_at = x_at + self.time(xt).reshape(1, n_kept, t, d).transpose(1, 2)
        return x_at + self.mlp(self.norm_mlp(x_at))

    def forward_at(self, x: torch.Tensor, rows: torch.Tensor,
                   valid: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``forward(x, valid)`` at the locations ``rows (B, Q)`` only: ``(B, T, Q, D)``.

        Temporal attention and the MLP act per location, so only the spatial attention
        needs every location (as keys and values).
        """
        b, t, length, d = x.shape
        q = rows.shape[1]
        key_valid = (None if valid is None
                     else valid[:, None, :].expand(b, t, length).reshape(b * t, length))
        h = self.norm_space(x)
        pick = rows[:, None, :, None].expand(b, t, q, d)
        x_at = torch.gather(x, 2, pick)
        x_at = x_at + self.space.forward_queries(
            torch.gather(h, 2, pick).reshape(b * t, q, d), h.reshape(b * t, length, d),
            key_valid).reshape(b, t, q, d)
        xt = self.norm_time(x_at).transpose(1, 2).reshape(b * q, t, d)
        x_at = x_at + self.time(xt).reshape(b, q, t, d).transpose(1, 2)
        return x_at + self.mlp(self.norm_mlp(x_at))


class JointBlock(nn.Module):
    """Full attention over all tokens of a sample: ``x (B, L, D)``, ``valid (B, L)``."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, dropout: float = 0.0):
        super().__init__()
        self.norm_attn, self.norm_mlp = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, dropout)
        self.mlp = Mlp(dim, mlp_ratio, dropout)

    def forward(self, x: torch.Tensor, valid: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = x + self.attn(self.norm_attn(x), valid)
        return x + self.mlp(self.norm_mlp(x))

    def forward_at(self, x: torch.Tensor, rows: torch.Tensor,
                   valid: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``forward(x, valid)`` at the tokens ``rows (B, Q)`` only: ``(B, Q, D)``."""
        d = x.shape[-1]
        h = self.norm_attn(x)
        pick = rows[..., None].expand(*rows.shape, d)
        x_at = torch.gather(x, 1, pick) + self.attn.forward_queries(torch.gather(h, 1, pick),
                                                                    h, valid)
        return x_at + self.mlp(self.norm_mlp(x_at))
