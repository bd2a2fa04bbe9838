"""Attention normalisers (softmax, alpha-entmax) and reference attention for our small transformer.

Every function here takes pre-softmax scores already scaled by 1/sqrt(d_head) and a boolean
``allowed`` mask broadcastable to the scores (True = the query may attend to the key).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

from ..errors import ConfigError

# Masked entries are set this far below the row maximum before entmax: any alpha >= 1.0001 then
# gives them exactly zero probability (the threshold lies within 1/(alpha-1) of the maximum).
_ENTMAX_MASK_GAP = 1e4


def check_alpha(alpha: float) -> float:
    """Validate an entmax alpha (must be > 1; alpha = 1 is softmax)."""
    if not alpha > 1.0:
        raise ConfigError(f"--alpha must be > 1 for entmax attention (got {alpha}); use --attention softmax for alpha = 1")
    return float(alpha)


def masked_softmax(scores: torch.Tensor, allowed: Optional[torch.Tensor]) -> torch.Tensor:
    """Softmax over the last axis; fully masked rows give all-zero probabilities (not NaN)."""
    if allowed is None:
        return torch.softmax(scores, dim=-1)
    s = scores.masked_fill(~allowed, float("-inf"))
    p = torch.softmax(s, dim=-1)
    return torch.nan_to_num(p, nan=0.0)


def masked_entmax(scores: torch.Tensor, allowed: Optional[torch.Tensor], alpha: float | torch.Tensor = 1.5) -> torch.Tensor:
    """alpha-entmax over the last axis, computed in float32 (bf16/fp16 give NaN in entmax).

    Uses the exact sort-based ``entmax15`` for alpha == 1.5, ``sparsemax`` for alpha == 2 and
    bisection otherwise (alpha may be a tensor broadcastable to scores, e.g. learnable per head).
    Masked keys get exactly zero; fully masked rows are all zero.
    """
    from entmax import entmax15, entmax_bisect, sparsemax  # imported on use: softmax-only work needs no entmax

    dtype = scores.dtype
    s = scores.float()
    if allowed is not None:
        row_max = s.masked_fill(~allowed, float("-inf")).amax(dim=-1, keepdim=True)
        row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
        s = torch.where(allowed, s, (row_max - _ENTMAX_MASK_GAP).expand_as(s))
    if isinstance(alpha, torch.Tensor):
        p = entmax_bisect(s, alpha.float(), dim=-1)
    elif alpha == 1.5:
        p = entmax15(s, dim=-1)
    elif alpha == 2.0:
        p = sparsemax(s, dim=-1)
    else:
        p = entmax_bisect(s, check_alpha(alpha), dim=-1)
    if allowed is not None:
        p = p * allowed
    return p.to(dtype)


def normaliser(kind: str, alpha: float | torch.Tensor = 1.5) -> Callable[[torch.Tensor, Optional[torch.Tensor]], torch.Tensor]:
    """Return the normaliser for ``kind`` in {softmax, entmax, sparsemax}."""
    if kind == "softmax":
        return masked_softmax
    if kind == "entmax":
        if not isinstance(alpha, torch.Tensor):
            check_alpha(alpha)
        return lambda s, m: masked_entmax(s, m, alpha)
    if kind == "sparsemax":
        return lambda s, m: masked_entmax(s, m, 2.0)
    raise ConfigError(f"--attention must be one of softmax, entmax, sparsemax (got {kind!r})")


def dense_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: Optional[torch.Tensor], kind: str = "softmax",
    alpha: float | torch.Tensor = 1.5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference attention: explicit scores, normaliser, weighted sum. Returns (out, probs)."""
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5  # (B, H, Nq, Nk)
    probs = normaliser(kind, alpha)(scores, allowed)
    return probs @ v, probs


def sdpa_softmax(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: Optional[torch.Tensor]) -> torch.Tensor:
    """Fused softmax attention (SDPA) for training and inference when probabilities are not needed."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
