"""Block-sparse attention patterns: token graph -> block graph -> FlexAttention ``BlockMask``.

Everything here is tensor ops on the inputs' device (no Python ``mask_mod`` evaluation over N^2 pairs),
so a predicted pattern becomes a ``BlockMask`` in well under a millisecond at N=32k
(../shared/notes/gpu-calibration.md: ``create_block_mask`` with a Python mask_mod costs as much as the
attention itself there).

Conventions
-----------
* A *block graph* is a bool tensor ``(B, H, nq, nk)``: entry ``[b, h, i, j]`` says whether query block ``i``
  attends to key block ``j`` (blocks of ``block_size`` consecutive tokens, after any permutation).
* A :class:`KVBlocks` is FlexAttention's ordered form of a block graph: per query block, the number of
  *partial* blocks (``mask_mod`` applied inside) and *full* blocks (``mask_mod`` skipped) and their kv block
  indices, left-aligned in ``(B, H, nq, nk)`` int32 tensors (the width must be ``nk``: ``BlockMask.to_dense``
  and the default sequence lengths read it from there).
* Semantics of a :class:`BlockPattern` (shared by the FlexAttention path and the dense fallback): token
  ``i`` attends to token ``j`` iff their blocks (in the permuted order, if any) are connected and, when
  causal, ``pos(j) <= pos(i)`` in the original order. Rows with no allowed key give a zero output.
* Sequence length must be a multiple of ``block_size`` (pad first); ``ShapeError`` otherwise.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

import torch
from torch import Tensor

from attnlab.blocksparse.permute import (  # noqa: F401  (re-exported)
    cluster_permutation,
    inverse_permutation,
    permute_tokens,
    unpermute_tokens,
)
from attnlab.errors import ConfigError, ShapeError

__all__ = [
    "KVBlocks",
    "BlockPattern",
    "token_to_block_graph",
    "expand_block_graph",
    "causal_block_graph",
    "block_graph_to_kv",
    "topk_to_kv",
    "kv_to_block_graph",
    "kv_to_blockmask",
    "block_graph_to_blockmask",
    "blockmask_block_graph",
    "blockmask_matches",
    "cluster_permutation",
    "inverse_permutation",
    "permute_tokens",
    "unpermute_tokens",
    "cluster_block_graph",
    "cluster_pattern",
    "pattern_from_block_graph",
    "band_block_graph",
    "window_pattern",
]


class KVBlocks(NamedTuple):
    """FlexAttention's ordered block lists: partial (mask_mod applied) and full blocks, int32."""

    kv_num_blocks: Tensor  # (B, H, nq)
    kv_indices: Tensor  # (B, H, nq, nk)
    full_kv_num_blocks: Tensor  # (B, H, nq)
    full_kv_indices: Tensor  # (B, H, nq, nk)


def _check_len(n: int, block_size: int) -> int:
    if block_size <= 0:
        raise ConfigError(f"block_size must be positive, got {block_size}")
    if n % block_size:
        raise ShapeError(f"sequence length {n} is not a multiple of block_size {block_size}; pad the inputs")
    return n // block_size


def token_to_block_graph(mask: Tensor, block_size: int, min_density: float = 0.0, pad: bool = False) -> Tensor:
    """Bool (..., N, M) token graph -> (..., N/bs, M/bs) block graph: a block is kept if the fraction of its
    pairs in the token graph exceeds ``min_density`` (0 = any pair). N and M must be multiples of
    ``block_size`` unless ``pad`` (then the last blocks are padded with absent pairs: ceil(N/bs) blocks)."""
    *lead, n, m = mask.shape
    if pad and (n % block_size or m % block_size):
        nq, nk = -(-n // max(1, block_size)), -(-m // max(1, block_size))
        full = torch.zeros(*lead, nq * block_size, nk * block_size, dtype=mask.dtype, device=mask.device)
        full[..., :n, :m] = mask
        mask, n, m = full, nq * block_size, nk * block_size
    nq, nk = _check_len(n, block_size), _check_len(m, block_size)
    counts = mask.reshape(*lead, nq, block_size, nk, block_size).sum(dim=(-3, -1), dtype=torch.int32)
    if min_density <= 0.0:
        return counts > 0
    return counts.float() > min_density * block_size * block_size


def expand_block_graph(block_graph: Tensor, block_size: int) -> Tensor:
    """(..., nq, nk) block graph -> (..., nq*bs, nk*bs) token mask (for the dense path and checks)."""
    return block_graph.repeat_interleave(block_size, dim=-2).repeat_interleave(block_size, dim=-1)


def causal_block_graph(nq: int, nk: int, device: torch.device | str | None = None) -> Tensor:
    """Lower-triangular (nq, nk) bool: key block j is not entirely in the future of query block i."""
    return torch.ones(nq, nk, dtype=torch.bool, device=device).tril_()


def _ordered(graph: Tensor) -> tuple[Tensor, Tensor]:
    """Bool (..., nq, nk) -> (counts int32 (..., nq), indices int32 (..., nq, nk)), kept blocks first in
    ascending order."""
    counts = graph.sum(-1, dtype=torch.int32)
    idx = torch.argsort(graph.to(torch.int8), dim=-1, descending=True, stable=True)
    return counts, idx.to(torch.int32)


def block_graph_to_kv(block_graph: Tensor, causal: bool = False) -> KVBlocks:
    """Block graph -> :class:`KVBlocks` (tensor ops on its device). Non-causal: every kept block is full.
    Causal: blocks above the diagonal are dropped, diagonal blocks are partial (causal mask_mod), the rest
    full."""
    if block_graph.dim() != 4:
        raise ShapeError(f"block graph must be (B, H, nq, nk), got {tuple(block_graph.shape)}")
    g = block_graph.bool()
    B, H, nq, nk = g.shape
    if not causal:
        zeros = torch.zeros(B, H, nq, dtype=torch.int32, device=g.device)
        cnt, idx = _ordered(g)
        return KVBlocks(zeros, torch.zeros_like(idx), cnt, idx)
    if nq != nk:
        raise ShapeError(f"causal block masks need nq == nk, got {nq} and {nk}")
    eye = torch.eye(nq, dtype=torch.bool, device=g.device)
    strict = torch.ones(nq, nk, dtype=torch.bool, device=g.device).tril_(-1)
    part_cnt, part_idx = _ordered(g & eye)
    full_cnt, full_idx = _ordered(g & strict)
    return KVBlocks(part_cnt, part_idx, full_cnt, full_idx)


def topk_to_kv(
    block_scores: Tensor,
    k: int | Tensor,
    causal: bool = False,
    force: Tensor | None = None,
    kmax: int | None = None,
) -> KVBlocks:
    """Block scores (B, H, nq, nk) -> :class:`KVBlocks` keeping the ``k`` highest blocks per query block
    (``k`` an int or an int tensor (B, H, nq) of per-row counts, e.g. from a mass threshold, clamped to
    [1, kmax]; pass ``kmax`` with a tensor ``k`` to avoid a device sync) without materialising a dense graph
    first. ``force`` (bool, broadcastable to the scores) marks blocks that are always kept (they count towards
    ``k``). Causal: future blocks are never kept, the diagonal is partial."""
    B, H, nq, nk = block_scores.shape
    s = block_scores.float()
    if force is not None:
        s = s.masked_fill(force, float("inf"))
    if causal:
        if nq != nk:
            raise ShapeError(f"causal block masks need nq == nk, got {nq} and {nk}")
        future = torch.ones(nq, nk, dtype=torch.bool, device=s.device).triu_(1)
        s = s.masked_fill(future, float("-inf"))
        s = s.masked_fill(torch.eye(nq, dtype=torch.bool, device=s.device), float("inf"))
    if isinstance(k, Tensor):
        if kmax is None:
            kmax = int(k.max().item()) if k.numel() else 1
        kmax = max(1, min(kmax, nk))
        counts = k.to(torch.int32).clamp(1, kmax)
    else:
        kmax = max(1, min(int(k), nk))
        counts = torch.full((B, H, nq), kmax, dtype=torch.int32, device=s.device)
    top = torch.topk(s, kmax, dim=-1, sorted=True)
    if causal:
        avail = torch.arange(1, nq + 1, dtype=torch.int32, device=s.device)
        counts = torch.minimum(counts, avail)
    # rows keep their first counts[r] (highest) entries; sort those ascending by block index for locality
    keep = torch.arange(kmax, device=s.device) < counts.unsqueeze(-1)
    sel = torch.where(keep, top.indices, nk)  # nk = "dropped", sorts last
    if causal:  # the diagonal (forced, so kept) becomes the one partial block; the rest are full
        diag = torch.arange(nq, device=s.device).view(1, 1, nq, 1)
        sel = torch.where(sel == diag, nk, sel)
        counts = counts - 1
    sel, _ = torch.sort(sel, dim=-1)
    idx = _pad_cols(sel.clamp_max(nk - 1).to(torch.int32), nk)
    if not causal:
        zeros = torch.zeros(B, H, nq, dtype=torch.int32, device=s.device)
        return KVBlocks(zeros, torch.zeros_like(idx), counts, idx)
    part_cnt = torch.ones(B, H, nq, dtype=torch.int32, device=s.device)
    part_idx = _pad_cols(diag.to(torch.int32).expand(B, H, nq, 1), nk)
    return KVBlocks(part_cnt, part_idx, counts, idx)


def _pad_cols(idx: Tensor, nk: int) -> Tensor:
    """Right-pad (..., k) int32 indices with zeros to width nk (entries past the count are never read)."""
    if idx.shape[-1] == nk:
        return idx.contiguous()
    pad = torch.zeros(*idx.shape[:-1], nk - idx.shape[-1], dtype=idx.dtype, device=idx.device)
    return torch.cat([idx, pad], dim=-1)


def _dense_from_ordered(counts: Tensor, idx: Tensor) -> Tensor:
    nk = idx.shape[-1]
    valid = torch.arange(nk, device=idx.device) < counts.unsqueeze(-1)
    target = torch.where(valid, idx.long(), nk)
    out = torch.zeros(*idx.shape[:-1], nk + 1, dtype=torch.bool, device=idx.device)
    out.scatter_(-1, target, True)
    return out[..., :nk]


def kv_to_block_graph(kv: KVBlocks) -> Tensor:
    """:class:`KVBlocks` -> bool block graph (partial | full), without going through ``BlockMask``."""
    return _dense_from_ordered(kv.kv_num_blocks, kv.kv_indices) | _dense_from_ordered(
        kv.full_kv_num_blocks, kv.full_kv_indices
    )


def _causal_mask_mod(b: Any, h: Any, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
    return q_idx >= kv_idx


def _window_mask_mod(window: int) -> Callable[..., Tensor]:
    """Causal sliding window (transformers' ``sliding_window_overlay``): key j seen by query i iff 0 <= i-j < w."""

    def windowed_causal(b: Any, h: Any, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return (q_idx >= kv_idx) & (q_idx - kv_idx < window)

    return windowed_causal


def band_block_graph(nq: int, block_size: int, window: int,
                     device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
    """(touched, full), (nq, nq) bool, of a causal sliding window of ``window`` tokens: tiles holding some pair
    with 0 <= q - kv < window, and tiles (strictly below the diagonal) where every pair is inside the window."""
    if window < 1:
        raise ConfigError(f"sliding window must be >= 1, got {window}")
    i = torch.arange(nq, device=device).view(-1, 1)
    d = i - i.view(1, -1)  # query block - key block
    touched = (d >= 0) & ((d - 1) * block_size + 1 < window)  # nearest pair's distance below the window
    full = (d > 0) & ((d + 1) * block_size - 1 < window)  # farthest pair's distance below the window
    return touched, full


def window_pattern(pattern: "BlockPattern", window: int | None) -> "BlockPattern":
    """The causal token-order ``pattern`` intersected with a sliding window of ``window`` tokens: tiles entirely
    outside the window are dropped; tiles crossing the window edge, and the diagonal, are partial (windowed
    causal mask_mod), tiles entirely inside are full. ``window`` None: the pattern unchanged."""
    if window is None:
        return pattern
    if not pattern.causal or pattern.permuted:
        raise ConfigError("a sliding window applies to causal patterns in token order (not clustered ones)")
    g = pattern.block_graph()
    touched, full = band_block_graph(g.shape[-1], pattern.block_size, window, g.device)
    g = g & touched
    part_cnt, part_idx = _ordered(g & ~full)
    full_cnt, full_idx = _ordered(g & full)
    return BlockPattern(KVBlocks(part_cnt, part_idx, full_cnt, full_idx), pattern.block_size, True, window=window)


try:  # FlexAttention exists from torch 2.5; without it only the dense path works
    from torch.nn.attention.flex_attention import BlockMask as _BlockMask

    _FROM_KV_PARAMS = set(inspect.signature(_BlockMask.from_kv_blocks).parameters)
except ImportError:  # pragma: no cover
    _BlockMask = None
    _FROM_KV_PARAMS = set()


def kv_to_blockmask(
    kv: KVBlocks,
    block_size: int,
    mask_mod: Callable[..., Tensor] | None = None,
    compute_q_blocks: bool = False,
) -> Any:
    """:class:`KVBlocks` -> ``BlockMask`` via ``BlockMask.from_kv_blocks`` (no mask evaluation). The q-side
    lists are only needed for backward, so they are skipped unless ``compute_q_blocks`` (torch builds whose
    ``from_kv_blocks`` has no such switch always build them)."""
    if _BlockMask is None:  # pragma: no cover
        raise ConfigError("this torch has no FlexAttention (needs torch >= 2.5); use backend='dense'")
    kwargs: dict[str, Any] = {"BLOCK_SIZE": block_size, "mask_mod": mask_mod}
    if "compute_q_blocks" in _FROM_KV_PARAMS:
        kwargs["compute_q_blocks"] = compute_q_blocks
    return _BlockMask.from_kv_blocks(
        kv.kv_num_blocks, kv.kv_indices, kv.full_kv_num_blocks, kv.full_kv_indices, **kwargs
    )


def block_graph_to_blockmask(block_graph: Tensor, block_size: int, causal: bool = False) -> Any:
    """Block graph (B, H, nq, nk) -> ``BlockMask`` (causal: future blocks dropped, causal mask_mod inside
    the diagonal blocks)."""
    return kv_to_blockmask(block_graph_to_kv(block_graph, causal), block_size,
                           _causal_mask_mod if causal else None)


def blockmask_block_graph(block_mask: Any) -> Tensor:
    """``BlockMask`` -> bool block graph via ``BlockMask.to_dense``."""
    return block_mask.to_dense().bool()


def blockmask_matches(block_mask: Any, block_graph: Tensor) -> bool:
    """True if the ``BlockMask`` covers exactly the blocks of ``block_graph`` (broadcast over B, H)."""
    dense = blockmask_block_graph(block_mask)
    return bool(torch.equal(dense, block_graph.bool().expand_as(dense)))


# Clustering / bucketing: tokens sorted by cluster id (permute.py) so that predicted pairs become dense blocks.


def _block_range(sorted_vals: Tensor, block_size: int) -> tuple[Tensor, Tensor]:
    *lead, n = sorted_vals.shape
    v = sorted_vals.reshape(*lead, n // block_size, block_size)
    return v.amin(-1), v.amax(-1)


def cluster_block_graph(q_ids_sorted: Tensor, k_ids_sorted: Tensor, block_size: int) -> Tensor:
    """Sorted ids (B, H, N) -> block graph of blocks sharing an id range: exact superset of the token pairs
    with equal ids (blocks of sorted ids are id intervals)."""
    _check_len(q_ids_sorted.shape[-1], block_size)
    _check_len(k_ids_sorted.shape[-1], block_size)
    qlo, qhi = _block_range(q_ids_sorted, block_size)
    klo, khi = _block_range(k_ids_sorted, block_size)
    return torch.maximum(qlo.unsqueeze(-1), klo.unsqueeze(-2)) <= torch.minimum(
        qhi.unsqueeze(-1), khi.unsqueeze(-2)
    )


@dataclass
class BlockPattern:
    """A predicted block-sparse attention pattern, ready for FlexAttention or the dense fallback.

    ``q_perm``/``k_perm`` (B, H, N) are set when tokens were reordered by cluster: block ``i`` then holds
    sorted positions ``i*bs..(i+1)*bs-1`` and the output is scattered back with ``q_perm``."""

    kv: KVBlocks
    block_size: int
    causal: bool = False
    q_perm: Tensor | None = None
    k_perm: Tensor | None = None
    window: int | None = None  # causal sliding window (tokens; key j seen by query i iff i - j < window)

    @property
    def permuted(self) -> bool:
        """Whether tokens are reordered."""
        return self.q_perm is not None

    def block_graph(self) -> Tensor:
        """Bool (B, H, nq, nk) of computed blocks."""
        return kv_to_block_graph(self.kv)

    def density(self) -> float:
        """Fraction of all nq*nk blocks that are computed (what the kernel's work scales with)."""
        cnt = self.kv.kv_num_blocks.float() + self.kv.full_kv_num_blocks.float()
        return float(cnt.sum() / (cnt.numel() * self.kv.kv_indices.shape[-1]))

    def mask_mod(self) -> Callable[..., Tensor] | None:
        """The element-level mask applied inside partial blocks (causal only)."""
        if not self.causal:
            return None
        if self.window is not None:
            if self.permuted:
                raise ConfigError("a sliding window applies to patterns in token order (not clustered ones)")
            return _window_mask_mod(self.window)
        if not self.permuted:
            return _causal_mask_mod
        qp, kp = self.q_perm, self.k_perm

        def perm_causal(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
            return qp[b, h, q_idx] >= kp[b, h, kv_idx]

        return perm_causal

    def block_mask(self, compute_q_blocks: bool = False) -> Any:
        """FlexAttention ``BlockMask`` (``from_kv_blocks``; cheap); q-side lists (backward) if asked."""
        return kv_to_blockmask(self.kv, self.block_size, self.mask_mod(), compute_q_blocks)

    def token_mask(self) -> Tensor:
        """Bool (B, H, N, N) allowed pairs in the ORIGINAL token order (dense path, tests; O(N^2) memory)."""
        g = expand_block_graph(self.block_graph(), self.block_size)
        B, H, n, _ = g.shape
        if self.permuted:
            # allowed_orig[i, j] = g[inv_q[i], inv_k[j]]
            inv_q = inverse_permutation(self.q_perm)
            inv_k = inverse_permutation(self.k_perm)
            g = torch.gather(g, 2, inv_q.unsqueeze(-1).expand(B, H, n, n))
            g = torch.gather(g, 3, inv_k.unsqueeze(-2).expand(B, H, n, n))
        if self.causal:
            g = g & torch.ones(n, n, dtype=torch.bool, device=g.device).tril_()
        if self.window is not None:
            g = g & torch.ones(n, n, dtype=torch.bool, device=g.device).triu_(1 - self.window)
        return g

    def allowed_rows(self, rows: Tensor) -> Tensor:
        """Bool (B, H, R, N): allowed keys (original order) of original query rows ``rows`` (R,) — used for
        recall on a subsample of rows without building the N x N mask."""
        g = self.block_graph()  # (B, H, nq, nk)
        B, H, nq, nk = g.shape
        n = nq * self.block_size
        dev = g.device
        rows = rows.to(dev)
        if self.permuted:
            inv_q = inverse_permutation(self.q_perm)
            inv_k = inverse_permutation(self.k_perm)
            qb = inv_q[:, :, rows] // self.block_size  # (B, H, R)
            kb = inv_k // self.block_size  # (B, H, N)
        else:
            qb = (rows // self.block_size).view(1, 1, -1).expand(B, H, -1)
            kb = (torch.arange(n, device=dev) // self.block_size).view(1, 1, -1).expand(B, H, -1)
        grow = torch.gather(g, 2, qb.unsqueeze(-1).expand(B, H, qb.shape[-1], nk))  # (B, H, R, nk)
        allowed = torch.gather(grow, 3, kb.unsqueeze(-2).expand(B, H, qb.shape[-1], n))
        if self.causal:
            allowed = allowed & (torch.arange(n, device=dev).view(1, 1, 1, n) <= rows.view(1, 1, -1, 1))
        if self.window is not None:
            allowed = allowed & (rows.view(1, 1, -1, 1) - torch.arange(n, device=dev).view(1, 1, 1, n) < self.window)
        return allowed


def pattern_from_block_graph(block_graph: Tensor, block_size: int, causal: bool = False) -> BlockPattern:
    """Block graph -> :class:`BlockPattern` in the original token order."""
    return BlockPattern(block_graph_to_kv(block_graph, causal), block_size, causal)


def cluster_pattern(
    q_ids: Tensor,
    k_ids: Tensor,
    block_size: int,
    causal: bool = False,
    extra_blocks: Tensor | None = None,
) -> BlockPattern:
    """Cluster ids (B, H, N) for queries and keys -> permuted :class:`BlockPattern`: queries and keys are
    sorted by id, a block pair is kept when the id ranges of the two blocks overlap (so every equal-id pair is
    covered), plus the diagonal and any ``extra_blocks`` (block graph in the sorted order). Causal: blocks
    whose keys are all later than all queries are dropped; blocks whose keys are all earlier are full; the
    rest are partial with a position-lookup mask_mod."""
    if q_ids.shape != k_ids.shape or q_ids.dim() != 3:
        raise ShapeError(f"q_ids and k_ids must both be (B, H, N), got {tuple(q_ids.shape)}, {tuple(k_ids.shape)}")
    nb = _check_len(q_ids.shape[-1], block_size)
    q_perm, _ = cluster_permutation(q_ids)
    k_perm, _ = cluster_permutation(k_ids)
    qs = torch.gather(q_ids, -1, q_perm)
    ks = torch.gather(k_ids, -1, k_perm)
    g = cluster_block_graph(qs, ks, block_size)
    g = g | torch.eye(nb, dtype=torch.bool, device=g.device)
    if extra_blocks is not None:
        g = g | extra_blocks.bool()
    if not causal:
        return BlockPattern(block_graph_to_kv(g, False), block_size, False, q_perm, k_perm)
    qlo, qhi = _block_range(q_perm, block_size)  # original positions per sorted block
    klo, khi = _block_range(k_perm, block_size)
    reachable = qhi.unsqueeze(-1) >= klo.unsqueeze(-2)  # some key not in the future of some query
    full = qlo.unsqueeze(-1) >= khi.unsqueeze(-2)  # every key at or before every query
    g = g & reachable
    part_cnt, part_idx = _ordered(g & ~full)
    full_cnt, full_idx = _ordered(g & full)
    return BlockPattern(KVBlocks(part_cnt, part_idx, full_cnt, full_idx), block_size, True, q_perm, k_perm)
