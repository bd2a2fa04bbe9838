"""Exact dense alpha-entmax attention: AdaSplash's Triton kernels on CUDA, ``entmax.entmax_bisect`` elsewhere.

Backends (registry :data:`DENSE_ENTMAX_BACKENDS`):

* ``adasplash`` (CUDA, ``pip install attnlab[gpu]``): AdaSplash-2 (``adasplash_v2``: causal, alpha = 1.5,
  GQA, histogram start + one Halley step) for causal alpha-1.5 calls, AdaSplash v1 (``adasplash_v1``,
  block-masked Halley-bisection, any alpha in (1, 2], causal or not) otherwise. Its kernels use the
  softmax scale 1/sqrt(d); another ``scale`` is folded into q. v2 needs N a power of two or a ``varlen``
  tensor (we pass one); v1 has no GQA, so k and v are repeated per query group.
* ``entmax``: dense scores in query chunks, ``entmax_bisect`` in float32 (float64 for float64 inputs).

``backend='auto'`` picks ``adasplash`` on CUDA when the package imports, else ``entmax`` -- with a warning
naming the package when CUDA is there but adasplash is not.
"""

from __future__ import annotations

import math
import warnings
from typing import Callable, Optional

import torch
from torch import Tensor

from ..errors import ConfigError, ShapeError

__all__ = ["dense_entmax_attention", "DENSE_ENTMAX_BACKENDS", "adasplash_available", "check_entmax_inputs",
           "resolve_dense_backend"]


def check_entmax_inputs(q: Tensor, k: Tensor, v: Tensor, alpha: float) -> int:
    """Shapes (B, H, N, d) q and (B, Hkv, M, d) k, v with Hkv dividing H, and alpha in (1, 2]; returns the
    query-group size H / Hkv (1 = no GQA)."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ShapeError(f"q, k, v must be (B, H, N, d); got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    from .contracts import FLOAT_DTYPES

    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dtype not in FLOAT_DTYPES:
            raise ShapeError(f"{name} has dtype {x.dtype}; attention needs float16, bfloat16, float32 or float64")
        if x.dtype != q.dtype or x.device != q.device:
            raise ShapeError(f"{name} must have q's dtype and device ({q.dtype}, {q.device}), got {x.dtype}, {x.device}")
    if k.shape[:3] != v.shape[:3] or q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1]:
        raise ShapeError(f"k and v must be (B, Hkv, M, d) with q's batch and head dim; got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    if k.shape[1] < 1 or q.shape[1] % k.shape[1]:
        raise ShapeError(f"grouped-query attention needs the kv heads of k/v ({k.shape[1]}) to divide the query "
                         f"heads of q ({q.shape[1]})")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 1.0 < float(alpha) <= 2.0:
        raise ConfigError(f"alpha must be in (1, 2] for entmax attention (got {alpha!r}; alpha = 1 is softmax, "
                          "2 is sparsemax)")
    return q.shape[1] // k.shape[1]


_WARNED: set[str] = set()


def adasplash_available() -> bool:
    """True when the ``adasplash`` package (and Triton) import."""
    try:
        import adasplash  # noqa: F401
    except Exception:  # ImportError, or Triton failing to initialise
        return False
    return True


def resolve_dense_backend(device: torch.device, backend: str = "auto") -> str:
    """'auto' -> 'adasplash' on CUDA with the package, else 'entmax' (warning once when CUDA lacks adasplash)."""
    if backend not in ("auto", *DENSE_ENTMAX_BACKENDS):
        raise ConfigError(f"backend must be auto or one of {sorted(DENSE_ENTMAX_BACKENDS)} (got {backend!r})")
    if backend != "auto":
        if backend == "adasplash" and (device.type != "cuda" or not adasplash_available()):
            raise ConfigError("backend='adasplash' needs a CUDA device and the adasplash package "
                              "(pip install 'attnlab[gpu]')")
        return backend
    if device.type != "cuda":
        return "entmax"
    if adasplash_available():
        return "adasplash"
    if "adasplash" not in _WARNED:
        _WARNED.add("adasplash")
        warnings.warn("CUDA is available but the 'adasplash' package is not installed: dense entmax attention "
                      "falls back to entmax.entmax_bisect (slow, O(N^2) memory); pip install 'attnlab[gpu]'",
                      RuntimeWarning, stacklevel=3)
    return "entmax"


def _entmax_bisect_backend(q: Tensor, k: Tensor, v: Tensor, alpha: float, scale: float, causal: bool,
                           n_iter: int, chunk: Optional[int]) -> Tensor:
    """Dense scores chunk by chunk of ``chunk`` query rows, ``entmax_bisect``, times v (GQA by head repeat)."""
    from entmax import entmax_bisect

    G = q.shape[1] // k.shape[1]
    k, v = (k, v) if G == 1 else (k.repeat_interleave(G, 1), v.repeat_interleave(G, 1))
    dt = torch.float64 if q.dtype == torch.float64 else torch.float32
    N, M = q.shape[2], k.shape[2]
    out = torch.empty(q.shape[:-1] + (v.shape[-1],), dtype=v.dtype, device=q.device)
    step = N if chunk is None else chunk
    for s in range(0, N, step):
        sc = (q[:, :, s:s + step].to(dt) @ k.to(dt).transpose(-1, -2)) * scale
        if causal:  # query i (of N, aligned to the end of the M keys) sees keys j <= i + M - N
            rows = torch.arange(s, min(s + step, N), device=q.device)[:, None] + (M - N)
            sc = sc.masked_fill(torch.arange(M, device=q.device)[None, :] > rows, float("-inf"))
        p = entmax_bisect(sc, alpha=alpha, dim=-1, n_iter=n_iter)
        out[:, :, s:s + step] = (p @ v.to(dt)).to(v.dtype)
        del sc, p
    return out


def _adasplash_backend(q: Tensor, k: Tensor, v: Tensor, alpha: float, scale: float, causal: bool,
                       n_iter: int, chunk: Optional[int]) -> Tensor:
    """AdaSplash-2 for causal alpha 1.5, AdaSplash v1 otherwise (``n_iter`` is ignored: their own solvers)."""
    import adasplash

    if q.shape[2] != k.shape[2]:
        raise ShapeError(f"adasplash needs as many queries as keys (got {q.shape[2]} and {k.shape[2]})")
    d = q.shape[-1]
    if not math.isclose(scale, d ** -0.5):
        q = q * (scale * math.sqrt(d))  # their kernels fix the scale at 1/sqrt(d)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    N = q.shape[2]
    if causal and alpha == 1.5:
        varlen = None if N & (N - 1) == 0 else torch.full((q.shape[0],), N, dtype=torch.int32, device=q.device)
        return adasplash.adasplash_v2(q, k, v, niter=1, varlen=varlen)
    G = q.shape[1] // k.shape[1]
    if G > 1:
        k, v = k.repeat_interleave(G, 1).contiguous(), v.repeat_interleave(G, 1).contiguous()
    return adasplash.adasplash_v1(q, k, v, alpha=alpha, is_causal=causal, niter=10)


#: Dense exact entmax attention backends, by name (see the module docstring).
DENSE_ENTMAX_BACKENDS: dict[str, Callable[..., Tensor]] = {
    "adasplash": _adasplash_backend,
    "entmax": _entmax_bisect_backend,
}


def dense_entmax_attention(q: Tensor, k: Tensor, v: Tensor, alpha: float = 1.5, scale: Optional[float] = None,
                           n_iter: int = 50, chunk: Optional[int] = None, causal: bool = False,
                           backend: str = "auto") -> Tensor:
    """Exact dense alpha-entmax attention (B, H, N, d); GQA when k/v have fewer heads. ``chunk`` bounds the
    memory of the ``entmax`` backend (query rows per score chunk); ``n_iter`` is its bisection count."""
    check_entmax_inputs(q, k, v, alpha)
    if isinstance(n_iter, bool) or not isinstance(n_iter, int) or n_iter < 1:
        raise ConfigError(f"n_iter must be a positive int (got {n_iter!r})")
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
        raise ConfigError(f"chunk must be a positive int or None (got {chunk!r})")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    name = resolve_dense_backend(q.device, backend)
    return DENSE_ENTMAX_BACKENDS[name](q, k, v, float(alpha), scale, causal, n_iter, chunk)
