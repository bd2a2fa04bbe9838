"""Predicted alpha-entmax attention executed block-sparsely with FlexAttention (no N x N matrix).

alpha-entmax of scores s over a row is p_j = relu(z_j - tau)^(1/(alpha-1)) with z = (alpha-1) s and the
threshold tau chosen so that sum_j p_j = 1. Given a *predicted* graph as a FlexAttention block mask:

1. bracket: tau lies in [max_j z_j - 1, max_j z_j] (the entmax threshold is within 1 of the row max), and
   |z_j| <= (alpha-1) scale |q| max|k| bounds the max without scoring anything;
2. bisection on tau per row (as ``entmax_bisect`` does), each step one block-sparse pass with
   score_mod = log(relu(z - tau)) / (alpha - 1): its log-sum-exp is log sum_j p_j(tau), and the sign of it
   says whether tau is too low (> 0) or too high (< 0) -- only the predicted pairs are ever scored;
3. the output is one more pass with the final tau: FlexAttention's softmax of that score_mod is
   p_j / sum_j p_j, i.e. exactly alpha-entmax restricted to the predicted pairs (the normalisation removes the
   remaining bisection error in the sum). When the predicted graph contains the true support, this equals
   dense alpha-entmax.

All passes are the same FlexAttention call (same score_mod reading a per-row tau buffer updated in place), so
one compiled kernel per shape serves them all. On CUDA the passes use ``torch.compile(flex_attention)``; on CPU flex_attention runs eagerly (slow,
exact: for tests in float64).
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import Tensor

from ..errors import ShapeError
from .contracts import check_alpha, check_block_mask, check_int, check_qkv, check_scale, keep_mask
from .flex import compiled_flex_attention

def _flex(device: torch.device):
    """flex_attention: compiled on CUDA (one shared compiled instance, see ``flex.compiled_flex_attention``), eager elsewhere."""
    from torch.nn.attention.flex_attention import flex_attention

    if device.type != "cuda":
        return flex_attention
    return compiled_flex_attention()


def token_to_block_graph(graph: Tensor, block: int) -> Tensor:
    """Token graph (B, H, N, N) -> block graph (B, H, ceil(N/b), ceil(N/b)): a block is kept if any pair is."""
    B, H, N, M = graph.shape
    nq, nk = -(-N // block), -(-M // block)
    g = torch.zeros(B, H, nq * block, nk * block, dtype=torch.bool, device=graph.device)
    g[..., :N, :M] = graph
    return g.view(B, H, nq, block, nk, block).any(dim=(3, 5))


def block_mask_from_graph(block_graph: Tensor, block: int, seq_len: Optional[int] = None) -> Any:
    """Block graph (B, H, nq, nk) -> FlexAttention ``BlockMask`` (via ``from_kv_blocks``; no mask evaluation).

    ``seq_len`` not a multiple of ``block``: the tail of the last block is masked with a mask_mod."""
    from torch.nn.attention.flex_attention import BlockMask

    bg = keep_mask(block_graph, "block_graph")
    check_int(block, "block")
    check_int(seq_len, "seq_len", optional=True)
    if seq_len is not None and not (bg.shape[-1] - 1) * block < seq_len <= bg.shape[-1] * block:
        raise ShapeError(f"seq_len {seq_len} does not fit {bg.shape[-1]} key blocks of {block} tokens")
    counts = bg.sum(-1).to(torch.int32)
    # kept key blocks first (stable: ascending block index), padded with any index
    order = torch.argsort((~bg).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    mask_mod = None
    if seq_len is not None and seq_len % block:
        n = seq_len

        def mask_mod(b, h, q_idx, kv_idx):  # noqa: ANN001
            return kv_idx < n

    return BlockMask.from_kv_blocks(counts, order, BLOCK_SIZE=block, mask_mod=mask_mod)


def _check(q: Tensor, k: Tensor, v: Tensor, alpha: float, scale: Any, n_iter: Any) -> None:
    """The shared contract of the entmax entry points (see ``contracts.py``)."""
    check_qkv(q, k, v)
    check_alpha(alpha)
    check_scale(scale)
    check_int(n_iter, "n_iter")


def _tau_mod(tau: Tensor, a1: float):
    """score_mod log(relu((alpha-1) s - tau_row)) / (alpha-1); its exp is the unnormalised entmax weight."""

    def tau_mod(score, b, h, q_idx, kv_idx):  # noqa: ANN001
        return torch.log(torch.relu(score * a1 - tau[b, h, q_idx])) / a1

    return tau_mod


def entmax_threshold(q: Tensor, k: Tensor, v: Tensor, block_mask: Any, alpha: float = 1.5,
                     scale: Optional[float] = None, n_iter: int = 30) -> Tensor:
    """Per-row entmax threshold tau (B, H, N) over the pairs of ``block_mask`` only, by bisection (see module).

    Bracket: |z_ij| <= U_i = (alpha-1) scale |q_i| max_j |k_j| and tau lies in [max_j z_ij - 1, max_j z_ij], so
    tau is in [-U_i - 1, U_i]; ``n_iter`` halvings of that bracket follow, each one block-sparse pass."""
    _check(q, k, v, alpha, scale, n_iter)
    check_block_mask(block_mask, q, k)
    a1 = alpha - 1.0
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    flex = _flex(q.device)
    dt = torch.float64 if q.dtype == torch.float64 else torch.float32
    U = a1 * scale * q.to(dt).norm(dim=-1) * k.to(dt).norm(dim=-1).amax(dim=-1, keepdim=True)  # (B, H, N)
    lo, hi = -U - 1.0, U.clone()
    tau = ((lo + hi) / 2).contiguous()
    mod = _tau_mod(tau, a1)
    for _ in range(n_iter):
        _, lse = flex(q, k, v, score_mod=mod, block_mask=block_mask, scale=scale, return_lse=True)
        too_low = lse.to(dt) >= 0  # sum_j p_j(tau) >= 1: tau must rise
        lo = torch.where(too_low, tau, lo)
        hi = torch.where(too_low, hi, tau)
        tau.copy_((lo + hi) / 2)  # in place: the score_mod keeps reading the same buffer
    return tau


def sparse_entmax_attention(q: Tensor, k: Tensor, v: Tensor, block_mask: Any, alpha: float = 1.5,
                            scale: Optional[float] = None, n_iter: int = 30) -> tuple[Tensor, Tensor]:
    """alpha-entmax attention restricted to ``block_mask`` (B, H, N, d): (output, tau per row).

    Every pass (bisection and output) is the same FlexAttention call with the same score_mod, so the compiled
    kernel is built once per shape."""
    _check(q, k, v, alpha, scale, n_iter)
    check_block_mask(block_mask, q, k)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    tau = entmax_threshold(q, k, v, block_mask, alpha, scale, n_iter)
    out = _flex(q.device)(q, k, v, score_mod=_tau_mod(tau, alpha - 1.0), block_mask=block_mask, scale=scale)
    return out, tau


def dense_entmax_attention(q: Tensor, k: Tensor, v: Tensor, alpha: float = 1.5, scale: Optional[float] = None,
                           n_iter: int = 50, chunk: Optional[int] = None) -> Tensor:
    """Reference: dense scores, ``entmax_bisect`` (torch bisection, float32 at least), times v; query chunks of
    ``chunk`` rows bound the memory (the n x n scores are materialised chunk by chunk)."""
    from entmax import entmax_bisect

    _check(q, k, v, alpha, scale, n_iter)
    check_int(chunk, "chunk", optional=True)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    dt = torch.float64 if q.dtype == torch.float64 else torch.float32
    out = torch.empty(q.shape[:-1] + (v.shape[-1],), dtype=v.dtype, device=q.device)
    step = q.shape[2] if chunk is None else chunk
    for s in range(0, q.shape[2], step):
        sc = (q[:, :, s:s + step].to(dt) @ k.to(dt).transpose(-1, -2)) * scale
        p = entmax_bisect(sc, alpha=alpha, dim=-1, n_iter=n_iter)
        out[:, :, s:s + step] = (p @ v.to(dt)).to(v.dtype)
        del sc, p
    return out
