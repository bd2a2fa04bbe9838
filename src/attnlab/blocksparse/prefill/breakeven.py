"""The kernel break-even density: the largest causal-tile density at which FlexAttention beats cuDNN SDPA,
measured once per (N, H, head_dim, dtype, device, block size) in this process."""

from __future__ import annotations

import statistics
from typing import Any, Callable

import torch

from ..blockmask import BlockPattern, block_graph_to_kv
from ..flex import run_pattern
from ...timing import time_ms
from .handler import dense_sdpa, head_density

__all__ = ["breakeven_density"]

_BREAKEVEN: dict[tuple, dict] = {}


def _cuda_time(fn: Callable[[], Any], reps: int = 5) -> float:
    return statistics.median(time_ms(fn, "cuda", reps, warmup=1))


def _random_causal_pattern(B: int, H: int, nb: int, density: float, bs: int, device: Any, seed: int = 0) -> BlockPattern:
    """Random causal tile pattern with about ``density`` of the causal tiles (diagonal always kept)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    r = torch.rand(B, H, nb, nb, generator=g).to(device)
    tril = torch.ones(nb, nb, dtype=torch.bool, device=device).tril_()
    keep = ((r < density) & tril) | torch.eye(nb, dtype=torch.bool, device=device)
    return BlockPattern(block_graph_to_kv(keep, True), bs, True)


@torch.no_grad()
def breakeven_density(n: int, n_heads: int, head_dim: int, dtype: torch.dtype, device: Any, block_size: int = 128,
                      grid: tuple[float, ...] = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)) -> dict:
    """Largest causal-tile density at which FlexAttention (kernel only) is faster than cuDNN causal SDPA on
    random q, k, v of this shape (linear interpolation between grid points); times per density included.
    Cached per (n, n_heads, head_dim, dtype, device) for the process."""
    key = (n, n_heads, head_dim, str(dtype), str(device), block_size)
    if key in _BREAKEVEN:
        return _BREAKEVEN[key]
    g = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (torch.randn(1, n_heads, n, head_dim, generator=g).to(device=device, dtype=dtype) for _ in range(3))
    scale = head_dim ** -0.5
    t_dense = _cuda_time(lambda: dense_sdpa(q, k, v, scale, "cudnn"))
    nb = n // block_size
    curve = []
    for d in grid:
        pat = _random_causal_pattern(1, n_heads, nb, d, block_size, device)
        bm = pat.block_mask()
        real = float(head_density(pat).mean())
        t = _cuda_time(lambda: run_pattern(q, k, v, pat, "flex", scale, block_mask=bm))
        curve.append({"density": real, "flex_ms": t, "speedup_vs_cudnn": t_dense / t,
                      "efficiency": (t_dense / t) * real})
    be = 0.0
    prev = None
    for c in curve:
        if c["flex_ms"] < t_dense:
            be = c["density"]
            prev = c
            continue
        if prev is not None:  # interpolate between the last faster and the first slower point
            f = (t_dense - prev["flex_ms"]) / max(1e-12, c["flex_ms"] - prev["flex_ms"])
            be = prev["density"] + f * (c["density"] - prev["density"])
        break
    res = {"breakeven": be, "cudnn_ms": t_dense, "curve": curve, "n": n, "heads": n_heads, "head_dim": head_dim}
    _BREAKEVEN[key] = res
    return res
