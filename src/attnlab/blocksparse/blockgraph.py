"""Block graphs and FlexAttention's ordered kv lists, as plain tensor ops (no FlexAttention needed here): token
graph -> block graph, block graph <-> :class:`KVBlocks`, top-k block indices -> kv lists, the causal band of a
sliding window and the block graph of cluster-sorted ids. Conventions: see :mod:`attnlab.blocksparse.blockmask`
(which re-exports every name here)."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from attnlab.errors import ConfigError, ShapeError

__all__ = ["KVBlocks", "token_to_block_graph", "expand_block_graph", "causal_block_graph", "block_graph_to_kv",
           "topk_to_kv", "kv_to_block_graph", "band_block_graph", "cluster_block_graph"]


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
