"""XAttention (Xu et al. 2025, mit-han-lab/x-attention), from the paper's description.

Each tile's importance is the softmax mass of a strided *antidiagonal* sample of its scores: queries and keys
are regrouped with stride S (key group ``k[i::S]`` paired with query group ``q[S-1-i::S]``, concatenated
along the feature axis), so one product of the regrouped (N/S, S*D) matrices sums S antidiagonal entries of
every S x S sub-block. These scores (scaled by 1/(sqrt(D) * S)) are softmaxed per regrouped row (causal at
the regrouped level) and summed per tile. Per query block, the diagonal and the first key block are kept,
then tiles in decreasing estimated mass until the cumulative estimate reaches the threshold ``tau`` of the
row total. The knob is ``tau`` (published default 0.9; here ``p`` without calibration).
Cost: (N/S)^2 * S*D multiply-adds per head (causal: half).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from attnlab.errors import ConfigError

from .registry import BLOCK_PREDICTORS
from .core import ScoredBlockMethod, _block_mass, mass_thresholds


def antidiagonal_block_mass(q: Tensor, k: Tensor, block_size: int, stride: int, causal: bool, scale: float,
                            head_chunk: int = 4, row_chunk: int = 2048) -> Tensor:
    """Estimated tile mass (B, H, nq, nk) from strided antidiagonal scores (rows sum to 1). The regrouped
    product is the exact block mass of the regrouped (N/S, S*D) q and k with (bs/S)-sized blocks, scale
    1/(sqrt(D) S) and causality at the regrouped level, so it reuses the fused block-mass kernel."""
    B, H, N, D = q.shape
    M = k.shape[2]
    if block_size % stride or N % stride:
        raise ConfigError(f"--stride: stride {stride} must divide block_size {block_size}")
    sub = block_size // stride
    dt = torch.float64 if q.dtype == torch.float64 else torch.float32
    out = torch.empty(B, H, N // block_size, M // block_size, dtype=dt, device=q.device)
    n_r = N // stride
    row_chunk = max(sub, row_chunk // sub * sub)
    for h0 in range(0, H, head_chunk):
        qh, kh = q[:, h0:h0 + head_chunk], k[:, h0:h0 + head_chunk]
        qr = torch.cat([qh[:, :, stride - 1 - i::stride] for i in range(stride)], dim=-1)
        kr = torch.cat([kh[:, :, i::stride] for i in range(stride)], dim=-1)
        hh = qr.shape[1]
        for r0 in range(0, n_r, row_chunk):
            rows = torch.arange(r0, min(n_r, r0 + row_chunk), device=q.device)
            bm = _block_mass(qr, kr, rows, sub, causal, scale / stride)  # (B, hh, R, nk)
            out[:, h0:h0 + hh, r0 // sub: (r0 + rows.numel()) // sub] = bm.view(B, hh, -1, sub, bm.shape[-1]).mean(3)
    return out


@BLOCK_PREDICTORS.register("xattention", help="XAttention: antidiagonal block scores, cumulative threshold",
                           tags=("published",))
@dataclass
class XAttentionBlocks(ScoredBlockMethod):
    """Antidiagonal scoring with stride ``stride``; knob = cumulative threshold tau per head."""

    stride: int = 8

    def prepare(self, q: Tensor, k: Tensor, causal: bool, block_size: int, scale: float) -> tuple[Any, float]:
        """Estimated tile mass from the regrouped product."""
        B, H, N, D = q.shape
        mass = antidiagonal_block_mass(q, k, block_size, self.stride, causal, scale)
        return mass, float(B * H * (N // self.stride) * (k.shape[2] // self.stride) * self.stride * D) * (
            0.5 if causal else 1.0)

    def thresholds(self, state: Any, causal: bool, block_size: int) -> Tensor:
        """Diagonal + first key block, then tiles until the cumulative estimate reaches tau."""
        return mass_thresholds(state, causal, sink_blocks=1)
