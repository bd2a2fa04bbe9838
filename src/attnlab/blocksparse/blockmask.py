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
from typing import Any, Callable

import torch
from torch import Tensor

from attnlab.blocksparse.permute import (  # noqa: F401  (re-exported)
    cluster_permutation,
    inverse_permutation,
    permute_tokens,
    unpermute_tokens,
)
from attnlab.blocksparse.blockgraph import (  # noqa: F401  (re-exported: the graph half lives there)
    KVBlocks,
    _block_range,
    _check_len,
    _ordered,
    band_block_graph,
    block_graph_to_kv,
    causal_block_graph,
    cluster_block_graph,
    expand_block_graph,
    kv_to_block_graph,
    token_to_block_graph,
    topk_to_kv,
)
from attnlab.errors import ConfigError

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


def _causal_mask_mod(b: Any, h: Any, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
    return q_idx >= kv_idx


def _window_mask_mod(window: int) -> Callable[..., Tensor]:
    """Causal sliding window (transformers' ``sliding_window_overlay``): key j seen by query i iff 0 <= i-j < w."""

    def windowed_causal(b: Any, h: Any, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return (q_idx >= kv_idx) & (q_idx - kv_idx < window)

    return windowed_causal


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
