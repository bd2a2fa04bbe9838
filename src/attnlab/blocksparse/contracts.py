"""The contracts of the public block-sparse tensor functions, checked in one place.

Every public tensor entry point (``sparse_attention``, ``sparse_entmax_attention``, ``dense_entmax_attention``,
the block predictors' ``predict_blocks``, ``block_mask_from_graph``, ``mass_recall``) calls these first, so a
bad dtype, shape, device or scalar raises :class:`~attnlab.errors.ShapeError` / :class:`~attnlab.errors.ConfigError`
naming the argument instead of a raw torch error, NaN output or silently cut tensors.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import Tensor

from attnlab.errors import ConfigError, ShapeError

__all__ = [
    "FLOAT_DTYPES",
    "check_qkv",
    "check_qk",
    "check_scale",
    "check_alpha",
    "check_int",
    "check_block_mask",
    "keep_mask",
]

#: Dtypes attention runs in (integer or complex q/k/v give all-zero or meaningless output).
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _tensor(x: Any, name: str) -> Tensor:
    if not isinstance(x, Tensor):
        raise ShapeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise ShapeError(f"{name} has dtype {x.dtype}; attention needs float16, bfloat16, float32 or float64 "
                         f"(convert with {name}.float())")
    if x.dim() != 4:
        raise ShapeError(f"{name} must be (B, H, N, D), got shape {tuple(x.shape)}")
    return x


def check_qk(q: Any, k: Any) -> None:
    """q, k float tensors (B, H, N, D) / (B, H, M, D) with equal B, H, D, dtype and device, N and M >= 1."""
    _tensor(q, "q")
    _tensor(k, "k")
    if q.dtype != k.dtype:
        raise ShapeError(f"q and k must have one dtype, got {q.dtype} and {k.dtype}")
    if q.device != k.device:
        raise ShapeError(f"q and k must be on one device, got {q.device} and {k.device}")
    if q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ShapeError(f"q and k must be (B, H, N, D) with equal B, H, D; got {tuple(q.shape)}, {tuple(k.shape)}")
    if q.shape[2] < 1 or k.shape[2] < 1 or q.shape[-1] < 1:
        raise ShapeError(f"q and k need at least one token and one dim; got {tuple(q.shape)}, {tuple(k.shape)}")


def check_qkv(q: Any, k: Any, v: Any) -> None:
    """q, k as in :func:`check_qk`; v (B, H, M, Dv) float with k's batch, heads, length, dtype and device."""
    check_qk(q, k)
    _tensor(v, "v")
    if v.dtype != q.dtype or v.device != q.device:
        raise ShapeError(f"v must have q's dtype and device ({q.dtype}, {q.device}), got {v.dtype}, {v.device}")
    if v.shape[:3] != k.shape[:3]:
        raise ShapeError(f"v must be (B, H, M, Dv) with k's B, H, M; got k {tuple(k.shape)}, v {tuple(v.shape)}")


def check_scale(scale: Any, name: str = "scale") -> Optional[float]:
    """None (1/sqrt(D)) or a finite number > 0."""
    if scale is None:
        return None
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise ConfigError(f"{name} must be a number or None, got {type(scale).__name__}")
    if not math.isfinite(scale) or scale <= 0:
        raise ConfigError(f"{name} must be a finite number > 0 (or None for 1/sqrt(head_dim)), got {scale}")
    return float(scale)


def check_alpha(alpha: Any, name: str = "alpha") -> float:
    """A finite entmax alpha > 1 (1.5 = entmax15, 2 = sparsemax; alpha -> 1 is softmax)."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise ConfigError(f"{name} must be a number, got {type(alpha).__name__}")
    if not math.isfinite(alpha) or alpha <= 1:
        raise ConfigError(f"{name} must be a finite number > 1 for entmax (1.5 = entmax15, 2 = sparsemax), got {alpha}")
    return float(alpha)


def check_int(value: Any, name: str, lo: int = 1, optional: bool = False) -> Optional[int]:
    """An int (not bool) >= ``lo``; None allowed with ``optional``."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name} must be an integer >= {lo}, got {value!r}")
    if value < lo:
        raise ConfigError(f"{name} must be >= {lo}, got {value}")
    return value


def keep_mask(mask: Any, name: str = "block_graph") -> Tensor:
    """A 4-d (B, H, rows, cols) keep-mask as bool: a bool or 0/1 integer tensor as is, a float tensor read as an
    SDPA-style additive mask (0 keep, -inf drop; NaN or other finite values -- a bias -- are refused)."""
    if not isinstance(mask, Tensor):
        raise ShapeError(f"{name} must be a torch.Tensor, got {type(mask).__name__}")
    if mask.dim() != 4:
        raise ShapeError(f"{name} must be 4-d (B, H, rows, cols), got shape {tuple(mask.shape)}")
    if not mask.is_floating_point():
        if mask.dtype != torch.bool and ((mask != 0) & (mask != 1)).any():
            raise ShapeError(f"{name}: an integer mask must hold 0 (drop) and 1 (keep) only")
        return mask.bool()
    if torch.isnan(mask).any():
        raise ShapeError(f"{name}: the float mask has NaN entries; use 0 (keep) and -inf (drop), or a bool mask")
    keep = mask > float("-inf")
    if (mask[keep] != 0).any():
        raise ConfigError(f"{name}: a float mask is read as an additive SDPA mask (0 keep, -inf drop); it has other "
                          "finite values (a bias) that a block pattern cannot carry -- pass a bool mask")
    return keep


def check_block_mask(block_mask: Any, q: Tensor, k: Tensor, name: str = "block_mask") -> None:
    """A FlexAttention ``BlockMask`` whose batch/heads are 1 or q's, and whose lengths cover q and k."""
    kv = getattr(block_mask, "kv_num_blocks", None)
    if not isinstance(kv, Tensor) or kv.dim() != 3:
        raise ShapeError(f"{name} must be a FlexAttention BlockMask (e.g. from block_mask_from_graph), "
                         f"got {type(block_mask).__name__}")
    B, H = q.shape[:2]
    if kv.shape[0] not in (1, B) or kv.shape[1] not in (1, H):
        raise ShapeError(f"{name} is for batch {kv.shape[0]}, heads {kv.shape[1]}; q has batch {B}, heads {H} "
                         f"(a mask must have 1 or the same number of each)")
    if kv.device != q.device:
        raise ShapeError(f"{name} is on {kv.device}, q on {q.device}")
    seq = getattr(block_mask, "seq_lengths", None)
    if seq is not None and (seq[0] < q.shape[2] or seq[1] < k.shape[2]):
        raise ShapeError(f"{name} covers {tuple(seq)} tokens, q and k have {q.shape[2]} and {k.shape[2]}")
