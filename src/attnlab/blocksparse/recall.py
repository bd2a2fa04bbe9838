"""The one recall measure of a block pattern, and the one row sampler.

Recall of a pattern for query row ``i`` = exact softmax mass (over every key the causal model allows) on the
keys the pattern keeps for ``i``. It is measured on sampled rows: :func:`sample_rows` draws them (uniformly
without replacement, or stratified over one parity: calibration uses even rows, held-out measures odd ones,
so the two never overlap), :func:`row_scores` scores them exactly, and :func:`pattern_row_recall` sums the
kept mass per row. :func:`head_recall` (per head, held-out rows), :func:`mass_recall` (mean, worst head,
top-k hit rate) and prefill's per-layer record are views of these.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from attnlab.errors import ConfigError, ShapeError
from attnlab.blocksparse.blockmask import BlockPattern
from attnlab.blocksparse.compiled import call_compiled

__all__ = [
    "sample_rows",
    "row_scores",
    "row_token_probs",
    "row_block_mass",
    "exact_block_mass",
    "pattern_row_recall",
    "head_recall",
    "mass_recall",
    "tile_density",
    "expand_kv_heads",
    "check_inputs",
]


def sample_rows(n: int, m: int, seed: int, parity: int | None = None,
                device: torch.device | str = "cpu") -> Tensor:
    """``m`` sorted int64 query rows of [0, n) drawn with ``seed``. ``parity`` None: uniformly without
    replacement (all rows if m >= n); 0 (calibration) or 1 (held-out): rows of that parity, one uniform draw
    in each of ``m`` equal strata (fewer if n is small)."""
    if parity is None:
        if m >= n:
            return torch.arange(n, device=device)
        return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:m].sort().values.to(device)
    cand = torch.arange(parity, n, 2)
    if m >= cand.numel():
        return cand.to(device)
    g = torch.Generator().manual_seed(seed)
    pick = ((torch.arange(m, dtype=torch.float64) + torch.rand(m, generator=g, dtype=torch.float64))
            * (cand.numel() / m)).long().clamp_max(cand.numel() - 1)
    return cand[pick.unique()].to(device)


def check_inputs(q: Tensor, k: Tensor, block_size: int) -> None:
    """q (B, H, N, D), k (B, Hk, M, D) with Hk | H and N, M multiples of ``block_size``."""
    if q.dim() != 4 or k.dim() != 4 or q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1]:
        raise ShapeError(f"q and k must be (B, H, N, D) with equal B and D; got {tuple(q.shape)}, {tuple(k.shape)}")
    if q.shape[1] % k.shape[1]:
        raise ShapeError(f"query heads {q.shape[1]} must be a multiple of key heads {k.shape[1]}")
    if block_size <= 0 or q.shape[2] % block_size or k.shape[2] % block_size:
        raise ShapeError(f"sequence lengths {q.shape[2]}, {k.shape[2]} must be multiples of block_size "
                         f"{block_size}; pad first")


def expand_kv_heads(k: Tensor, n_heads: int) -> Tensor:
    """Grouped-query attention: repeat each key head for its ``n_heads // Hk`` query heads (no copy if equal)."""
    if k.shape[1] == n_heads:
        return k
    return k.repeat_interleave(n_heads // k.shape[1], dim=1)


def row_scores(q: Tensor, k: Tensor, rows: Tensor, causal: bool, scale: float,
               dtype: torch.dtype | None = None) -> Tensor:
    """Exact scores (B, H, R, M) of query ``rows`` against all keys (causal: future keys -inf), in ``dtype``
    (default float32; float64 inputs stay float64). q and k have equal heads."""
    dt = dtype or (torch.float64 if q.dtype == torch.float64 else torch.float32)
    s = torch.matmul(q[:, :, rows].to(dt), k.to(dt).transpose(-1, -2)) * scale
    if causal:
        m = k.shape[2]
        s = s.masked_fill(torch.arange(m, device=q.device).view(1, 1, 1, m) > rows.view(1, 1, -1, 1), float("-inf"))
    return s


def row_token_probs(q: Tensor, k: Tensor, rows: Tensor, causal: bool = True, scale: float | None = None) -> Tensor:
    """Exact softmax probabilities (B, H, R, M) of query ``rows`` over all keys (float32; float64 inputs stay
    float64). ``k`` may have fewer heads (GQA)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return torch.softmax(row_scores(q, expand_kv_heads(k, q.shape[1]), rows, causal, scale), dim=-1)


def _block_mass_eager(q: Tensor, k: Tensor, rows: Tensor, block_size: int, causal: bool, scale: float) -> Tensor:
    """Exact per-key-block softmax mass (B, h, R, nk) of ``rows``: max-shifted exponentials summed per block."""
    s = row_scores(q, k, rows, causal, scale)
    e = torch.exp(s - s.amax(-1, keepdim=True))
    b = e.view(*e.shape[:-1], k.shape[2] // block_size, block_size).sum(-1)
    return b / b.sum(-1, keepdim=True)


def _block_mass(q: Tensor, k: Tensor, rows: Tensor, block_size: int, causal: bool, scale: float) -> Tensor:
    """On CUDA ``torch.compile``d (mask, max, exp and block sums fused: the R x N scores are read twice
    instead of written and read ~6 times)."""
    if q.is_cuda:
        return call_compiled("block_mass", _block_mass_eager, q, k, rows, block_size, causal, scale)
    return _block_mass_eager(q, k, rows, block_size, causal, scale)


def row_block_mass(q: Tensor, k: Tensor, rows: Tensor, block_size: int, causal: bool = True,
                   scale: float | None = None, head_chunk: int = 4) -> Tensor:
    """Exact softmax mass (B, H, R, nk) of query ``rows`` per key block (head chunks bound memory)."""
    k = expand_kv_heads(k, q.shape[1])
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    out = [_block_mass(q[:, h0:h0 + head_chunk], k[:, h0:h0 + head_chunk], rows, block_size, causal, scale)
           for h0 in range(0, q.shape[1], head_chunk)]
    return torch.cat(out, dim=1)


@torch.no_grad()
def exact_block_mass(q: Tensor, k: Tensor, block_size: int, causal: bool = True, scale: float | None = None,
                     row_chunk: int = 2048) -> Tensor:
    """Exact tile mass (B, H, nq, nk): for each query block, the mean over its rows of each key block's softmax
    mass (rows of the result sum to 1). Costs one full q.k^T (the oracle's price), computed in row chunks."""
    check_inputs(q, k, block_size)
    k = expand_kv_heads(k, q.shape[1])
    B, H, N, D = q.shape
    nk = k.shape[2] // block_size
    row_chunk = max(block_size, row_chunk // block_size * block_size)
    dt = torch.float64 if q.dtype == torch.float64 else torch.float32
    out = torch.empty(B, H, N // block_size, nk, dtype=dt, device=q.device)
    for r0 in range(0, N, row_chunk):
        rows = torch.arange(r0, min(N, r0 + row_chunk), device=q.device)
        bm = row_block_mass(q, k, rows, block_size, causal, scale)  # (B, H, R, nk)
        out[:, :, r0 // block_size: (r0 + rows.numel()) // block_size] = bm.view(
            B, H, -1, block_size, nk).mean(dim=3)
    return out


def pattern_row_recall(pattern: BlockPattern, rows: Tensor, row_mass: Tensor | None = None,
                       row_probs: Tensor | None = None, dense_heads: Tensor | None = None) -> Tensor:
    """Recall (B, H, R) of ``pattern`` for query ``rows``: with ``row_mass`` (B, H, R, nk) exact block mass
    (unpermuted patterns), or ``row_probs`` (B, H, R, M) exact token probabilities (any pattern; M may be
    shorter than the pattern's padded length). ``dense_heads`` (H,) bool: heads that ran dense keep every key."""
    if not pattern.permuted and row_mass is not None and dense_heads is None:
        g = pattern.block_graph()
        qb = (rows // pattern.block_size).to(g.device)
        return (g[:, :, qb].to(row_mass.dtype) * row_mass).sum(-1)
    if row_probs is None:
        raise ConfigError("a permuted pattern needs row_probs (token probabilities) to measure recall")
    allowed = pattern.allowed_rows(rows)[..., : row_probs.shape[-1]]
    if dense_heads is not None:
        allowed = allowed | dense_heads.to(allowed.device).view(1, -1, 1, 1)
    return (row_probs * allowed).sum(-1)


@torch.no_grad()
def head_recall(q: Tensor, k: Tensor, pattern: BlockPattern, rows: int = 512, seed: int = 1,
                scale: float | None = None, parity: int = 1) -> dict[str, Any]:
    """Measured recall of ``pattern`` on held-out rows (odd positions by default; calibration uses even):
    per head (H,) mean over batch and rows, its min and mean, and the rows used."""
    idx = sample_rows(q.shape[2], rows, seed, parity, q.device)
    if pattern.permuted:
        rec = pattern_row_recall(pattern, idx, row_probs=row_token_probs(q, k, idx, pattern.causal, scale))
    else:
        rec = pattern_row_recall(pattern, idx, row_mass=row_block_mass(q, k, idx, pattern.block_size,
                                                                       pattern.causal, scale))
    per_head = rec.float().mean(dim=(0, 2))
    return {"per_head": per_head, "min": float(per_head.min()), "mean": float(per_head.mean()),
            "rows": int(idx.numel())}


def mass_recall(q: Tensor, k: Tensor, pattern: BlockPattern, rows: int = 256, topk: int = 64,
                scale: float | None = None, seed: int = 0) -> dict[str, float]:
    """Recall of the pattern against exact dense attention on ``rows`` uniformly sampled query rows (same rows
    for every head; float32 scores): ``mass`` = mean softmax mass inside the kept pairs; ``mass_min_head`` =
    worst head; ``topk`` = fraction of each row's ``topk`` largest-logit keys that are kept."""
    from attnlab.blocksparse.contracts import check_int, check_qk, check_scale

    check_qk(q, k)
    check_int(rows, "rows")
    check_int(topk, "topk")
    check_scale(scale)
    if not isinstance(pattern, BlockPattern):
        raise ConfigError(f"pattern must be a BlockPattern (e.g. from sparse_attention(..., return_pattern=True)), "
                          f"got {type(pattern).__name__}")
    N, D = q.shape[2], q.shape[3]
    scale = D ** -0.5 if scale is None else scale
    idx = sample_rows(N, rows, seed, None, q.device)
    s = row_scores(q, k, idx, pattern.causal, scale, torch.float32)  # (B, H, R, N)
    mass = pattern_row_recall(pattern, idx, row_probs=torch.softmax(s, dim=-1))  # (B, H, R)
    allowed = pattern.allowed_rows(idx)
    top = torch.topk(s, min(topk, N), dim=-1).indices
    valid = torch.isfinite(torch.gather(s, -1, top))
    hit = torch.gather(allowed, -1, top) & valid
    top_rec = hit.sum(-1).float() / valid.sum(-1).clamp_min(1).float()
    return {"mass": float(mass.mean()), "mass_min_head": float(mass.mean(dim=(0, 2)).min()),
            "topk": float(top_rec.mean())}


def tile_density(pattern: BlockPattern) -> float:
    """Kept tiles / tiles that dense attention computes (causal: nq(nq+1)/2 per head and batch row)."""
    kv = pattern.kv
    kept = float(kv.kv_num_blocks.sum() + kv.full_kv_num_blocks.sum())
    B, H, nq = kv.kv_num_blocks.shape
    nk = kv.kv_indices.shape[-1]
    per = nq * (nq + 1) / 2 if pattern.causal else nq * nk
    return kept / (B * H * per)
