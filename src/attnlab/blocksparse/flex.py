"""Predicted block-sparse attention: predict the tile pattern, run compiled FlexAttention with it.

``sparse_attention(q, k, v, predictor=..., block_size=128, budget=..., causal=False)``:

1. the predictor turns q, k into a :class:`~attnlab.blocksparse.blockmask.BlockPattern` (block level: no N x N
   token graph; optionally a token permutation by cluster);
2. the pattern becomes a ``BlockMask`` through ``BlockMask.from_kv_blocks`` (tensor ops, no mask_mod
   evaluation);
3. on CUDA, ``torch.compile(flex_attention)`` runs only the kept tiles (tokens permuted first and the output
   scattered back when the pattern is permuted). On CPU, or with ``backend='dense'``, a slow but exact path
   computes masked dense attention with the same semantics (token ``i`` sees token ``j`` iff their tiles
   are kept and, if causal, ``j <= i``; rows with no key give 0), so CI can test everything but the kernel.

This module imports neither ``attnlab.models`` nor entmax, so it runs on the GPU box with
``PYTHONPATH=src``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from attnlab.errors import ConfigError, ShapeError
from attnlab.blocksparse.adapter import AssignBlockPredictor, as_block_predictor
from attnlab.blocksparse.contracts import check_int, check_qk, check_qkv, check_scale, keep_mask
from attnlab.blocksparse.blockmask import (
    BlockPattern,
    permute_tokens,
    pattern_from_block_graph,
    token_to_block_graph,
    unpermute_tokens,
)
from attnlab.blocksparse.compiled import compiled
from attnlab.blocksparse.predictors.cluster import ClusterBlockPredictor
from attnlab.blocksparse.predictors.core import BlockPredictor
from attnlab.blocksparse.predictors.pooled import PooledBudgetPredictor
from attnlab.blocksparse.recall import mass_recall

__all__ = [
    "sparse_attention",
    "run_pattern",
    "softcap_score_mod",
    "resolve_pattern",
    "dense_attention_sdpa",
    "masked_attention_reference",
    "flex_available",
    "compiled_flex_attention",
    "tuned_kernel_options",
    "TUNED_KERNEL_OPTIONS",
    "mass_recall",
    "masked_rows_reference",
    "relative_error",
    "BlockPredictor",
    "PooledBudgetPredictor",
    "ClusterBlockPredictor",
    "AssignBlockPredictor",
]

#: FlexAttention ``kernel_options`` per head dim, from ``benchmarks/block_kernels.py`` on an H100 (torch 2.11,
#: causal bf16, 128-token tiles, 16k-32k): for head dim 64 the built-in choice was best or within noise of the
#: best of six settings; for 128, 64x64 tiles with 4 warps and 3 stages were 3-8% faster at densities 5-50%.
TUNED_KERNEL_OPTIONS: dict[int, dict[str, Any] | None] = {
    64: None,
    128: {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3},
}


def tuned_kernel_options(head_dim: int) -> dict[str, Any] | None:
    """The measured best ``kernel_options`` for ``head_dim`` (None: FlexAttention's own choice)."""
    opts = TUNED_KERNEL_OPTIONS.get(head_dim)
    return None if opts is None else dict(opts)


def flex_available(device: torch.device | str) -> bool:
    """True when the compiled FlexAttention kernel can be used on ``device`` (CUDA and torch >= 2.5)."""
    if torch.device(device).type != "cuda" or not torch.cuda.is_available():
        return False
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
    except ImportError:  # pragma: no cover
        return False
    return True


def compiled_flex_attention() -> Any:
    """``torch.compile(flex_attention, dynamic=False)``, created once per process."""
    import torch._dynamo

    from torch.nn.attention.flex_attention import flex_attention

    cfg = torch._dynamo.config
    for name in ("cache_size_limit", "recompile_limit"):  # one compiled graph per shape
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), 64))
    return compiled("flex", flex_attention, dynamic=False)


def dense_attention_sdpa(q: Tensor, k: Tensor, v: Tensor, causal: bool = False, scale: float | None = None,
                         flash: bool = True) -> Tensor:
    """Dense baseline: ``scaled_dot_product_attention`` (FlashAttention backend on CUDA half/bf16)."""
    import torch.nn.functional as F

    if flash and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)


def masked_attention_reference(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None,
                               scale: float | None = None) -> Tensor:
    """Exact masked softmax attention in the inputs' dtype (pass float64 for a reference). ``mask`` bool,
    broadcastable to (B, H, N, M); rows with no allowed key give 0 (FlexAttention's convention)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    if mask is None:
        return torch.matmul(torch.softmax(s, dim=-1), v)
    return masked_attention_reference_from_scores(s, mask, v)


def resolve_pattern(q: Tensor, k: Tensor, predictor: Any = None, block_size: int = 128,
                    budget: float | int | None = None, causal: bool = False,
                    scale: float | None = None) -> BlockPattern:
    """Turn any supported ``predictor`` into a :class:`BlockPattern`:

    * ``None`` -> ``PooledBudgetPredictor(budget=budget or 0.1)``;
    * a :class:`BlockPattern` (used as is);
    * a bool tensor, (B, H, N/bs, M/bs) block graph or (B, H, N, M) token graph (any pair -> tile; B and H
      may be 1); a float tensor is read as an SDPA-style additive mask: 0 keep, -inf drop (other values,
      i.e. a bias, are refused: the pattern cannot carry them);
    * an object with ``predict_blocks`` (``budget`` replaces its ``budget`` field when given);
    * a token-level predictor with ``assign(q, k)`` (bucket ids -> permutation);
    * a token-level predictor with only ``predict(q, k, valid)`` -> token graph (O(N^2): small N only)
    (the last three through :func:`attnlab.blocksparse.adapter.as_block_predictor`)."""
    check_qk(q, k)
    check_int(block_size, "block_size")
    check_scale(scale)
    n, m = q.shape[2], k.shape[2]
    if n % block_size or m % block_size:
        raise ShapeError(f"sequence lengths {n}, {m} must be multiples of block_size {block_size}; pad first")
    if predictor is None:
        predictor = PooledBudgetPredictor(budget=0.1 if budget is None else budget)
        budget = None
    if isinstance(predictor, BlockPattern):
        if predictor.block_size != block_size or predictor.causal != causal:
            raise ConfigError("the given BlockPattern has another block_size or causal flag than the call")
        return predictor
    if isinstance(predictor, Tensor):
        return _pattern_from_mask(q, predictor, n, m, block_size, causal)
    return as_block_predictor(predictor, budget).predict_blocks(q, k, block_size, causal, scale)


def _pattern_from_mask(q: Tensor, mask: Tensor, n: int, m: int, block_size: int, causal: bool) -> BlockPattern:
    g = keep_mask(mask, "predictor")
    if g.device != q.device:
        raise ShapeError(f"predictor mask is on {g.device}, q on {q.device}")
    if g.shape[-2:] == (n, m) and (n, m) != (n // block_size, m // block_size):
        g = token_to_block_graph(g, block_size)
    elif g.shape[-2:] != (n // block_size, m // block_size):
        raise ShapeError(f"mask shape {tuple(g.shape)} fits neither N={n} nor N/bs={n // block_size}")
    B, H = q.shape[:2]
    if g.shape[0] not in (1, B) or g.shape[1] not in (1, H):
        raise ShapeError(f"predictor mask has batch {g.shape[0]}, heads {g.shape[1]}; q has batch {B}, heads {H} "
                         "(use 1 or the same number of each)")
    return pattern_from_block_graph(g.expand(B, H, -1, -1), block_size, causal)


def softcap_score_mod(softcap: float) -> Any:
    """FlexAttention ``score_mod`` of Gemma-2's logit softcapping: ``cap * tanh(score / cap)`` (scaled score)."""

    def capped(score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return torch.tanh(score / softcap) * softcap

    return capped


def run_pattern(q: Tensor, k: Tensor, v: Tensor, pattern: BlockPattern, backend: str = "auto",
                scale: float | None = None, block_mask: Any = None,
                kernel_options: dict[str, Any] | None = None, softcap: float | None = None) -> Tensor:
    """Attention restricted to ``pattern``. backend: 'auto' (flex on CUDA, else dense) | 'flex' | 'dense'.
    ``block_mask`` may pass a prebuilt ``pattern.block_mask()``. When autograd will differentiate through the
    call (an input requires grad), the mask carries the q-side block lists the backward kernel reads.
    ``softcap``: scores become ``softcap * tanh(score / softcap)`` before masking (a FlexAttention score_mod)."""
    if backend not in ("auto", "flex", "dense"):
        raise ConfigError(f"backend must be 'auto', 'flex' or 'dense', got {backend!r}")
    use_flex = backend == "flex" or (backend == "auto" and flex_available(q.device))
    if not use_flex:
        if softcap:
            sc = q.shape[-1] ** -0.5 if scale is None else scale
            s = torch.tanh(torch.matmul(q, k.transpose(-1, -2)) * sc / softcap) * softcap
            return masked_attention_reference_from_scores(s, pattern.token_mask(), v)
        return masked_attention_reference(q, k, v, pattern.token_mask(), scale)
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    bm = pattern.block_mask(grad) if block_mask is None else block_mask
    if grad and bm.q_indices is None:
        bm = pattern.block_mask(True)
    flex = compiled_flex_attention()
    if pattern.permuted:
        q = permute_tokens(q, pattern.q_perm)
        k = permute_tokens(k, pattern.k_perm)
        v = permute_tokens(v, pattern.k_perm)
    smod = softcap_score_mod(softcap) if softcap else None
    out = flex(q, k, v, score_mod=smod, block_mask=bm, scale=scale, kernel_options=kernel_options)
    return unpermute_tokens(out, pattern.q_perm) if pattern.permuted else out


def sparse_attention(q: Tensor, k: Tensor, v: Tensor, predictor: Any = None, block_size: int = 128,
                     budget: float | int | None = None, causal: bool = False, scale: float | None = None,
                     backend: str = "auto", return_pattern: bool = False,
                     kernel_options: dict[str, Any] | None = None) -> Tensor | tuple[Tensor, BlockPattern, dict]:
    """Predicted block-sparse attention. q, k, v (B, H, N, D); N a multiple of ``block_size``.

    ``predictor``: None (a :class:`PooledBudgetPredictor`), a BlockPattern, a bool block/token mask, or a
    predictor object (see :func:`resolve_pattern`). ``budget``: how many key blocks each query block may
    compute: a fraction of the key blocks in (0, 1] (e.g. 0.1 = at most 10% of tiles per block row) or an int
    count of blocks; None keeps the predictor's own (0.1 for the default predictor). It replaces the
    ``budget`` field of a dataclass predictor (ConfigError if it has none); a mask or BlockPattern ignores it.
    The budget caps work, it does not guarantee recall: check ``mass_recall`` on your data.
    Returns the output (B, H, N, D), or ``(out, pattern, stats)`` with ``return_pattern`` (stats: density =
    fraction of tiles computed, permuted, backend)."""
    check_qkv(q, k, v)
    pattern = resolve_pattern(q, k, predictor, block_size, budget, causal, scale)
    out = run_pattern(q, k, v, pattern, backend, scale, kernel_options=kernel_options)
    if not return_pattern:
        return out
    used = "flex" if backend == "flex" or (backend == "auto" and flex_available(q.device)) else "dense"
    stats = {"density": pattern.density(), "permuted": pattern.permuted, "backend": used}
    return out, pattern, stats


# ----------------------------------------------------------------------------------------------------
# References (mass_recall, re-exported here, lives in recall.py)
# ----------------------------------------------------------------------------------------------------


def masked_rows_reference(q: Tensor, k: Tensor, v: Tensor, pattern: BlockPattern, rows: Tensor,
                          scale: float | None = None) -> Tensor:
    """Exact float64 output (B, H, R, D) of the pattern's masked attention for original query ``rows`` (R,):
    checks the FlexAttention path (permutation, causal, tiles) at any N without an N x N mask."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    rows = rows.to(q.device)
    s = torch.matmul(q[:, :, rows].double(), k.double().transpose(-1, -2)) * scale
    allowed = pattern.allowed_rows(rows)
    return masked_attention_reference_from_scores(s, allowed, v.double())


def masked_attention_reference_from_scores(s: Tensor, mask: Tensor, v: Tensor) -> Tensor:
    """softmax(s masked) @ v with empty rows -> 0. A non-finite value row of a masked-out key does not reach
    the rows that do not see it (0 * NaN would spread it to every row); a kept one does."""
    s = s.masked_fill(~mask, float("-inf"))
    empty = ~mask.any(dim=-1, keepdim=True)
    p = torch.softmax(s.masked_fill(empty, 0.0), dim=-1).masked_fill(empty | ~mask, 0.0)
    bad = ~torch.isfinite(v).all(dim=-1)  # (..., M)
    if not bad.any():
        return torch.matmul(p, v)
    out = torch.matmul(p, v.masked_fill(bad.unsqueeze(-1), 0.0))
    seen = (mask & bad.unsqueeze(-2)).any(dim=-1, keepdim=True)  # a row that sees a non-finite value
    return out.masked_fill(seen, float("nan"))


def relative_error(out: Tensor, ref: Tensor) -> float:
    """||out - ref|| / ||ref|| in float64."""
    out, ref = out.double(), ref.double()
    return float(torch.linalg.vector_norm(out - ref) / torch.linalg.vector_norm(ref).clamp_min(1e-300))


def __getattr__(name: str) -> Any:
    """Deprecated names: ``block_predictors`` (an unused name -> class dict; use the registry
    ``attnlab.blocksparse.predictors.BLOCK_PREDICTORS``) and ``PooledBlockPredictor``."""
    import warnings

    if name == "block_predictors":
        warnings.warn("attnlab.blocksparse.flex.block_predictors is deprecated: use "
                      "attnlab.blocksparse.predictors.BLOCK_PREDICTORS", DeprecationWarning, stacklevel=2)
        return {"pooled": PooledBudgetPredictor, "cluster": ClusterBlockPredictor, "assign": AssignBlockPredictor}
    if name == "PooledBlockPredictor":
        warnings.warn("PooledBlockPredictor is now PooledBudgetPredictor", DeprecationWarning, stacklevel=2)
        return PooledBudgetPredictor
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
