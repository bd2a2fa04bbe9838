"""Predicted alpha-entmax attention executed block-sparsely with FlexAttention (no N x N matrix), causal or not,
with grouped-query attention.

alpha-entmax of scores s over a row is p_j = relu(z_j - tau)^r with z = (alpha-1) s, r = 1/(alpha-1) and the
threshold tau chosen so that f(tau) = sum_j relu(z_j - tau)^r = 1. Only the pairs of a *predicted* block mask
are ever scored. Every pass is the same FlexAttention call whose score_mod is
``where(x > 0, w * log x, -inf) + beta * s`` with x = z - tau_row and (w, beta) read from a tensor, so its
log-sum-exp is log sum_j relu(z_j - tau)^w (+ beta s): one compiled kernel per shape serves all passes.

Solver (a few passes instead of 30 bisection steps):

1. start: one pass with (w, beta) = (0, BETA) gives lse/BETA in [m, m + log(M)/BETA] (m = row max of s over the
   predicted pairs), hence the bracket tau in [a1 (m - log M / BETA) - 1, a1 m_hat - M^-(alpha-1)], a1 = alpha-1
   (f(a1 m - 1) >= 1, and f <= M (m a1 - tau)^r);
2. Newton on psi(tau) = f(tau)^(1/r) - 1: psi is convex and decreasing (an r-norm of relu(z - tau)), so a
   Newton step from either side lands left of the root and the iterates then rise monotonically; it is exact
   when the support scores are equal. f comes from a pass with w = r, f' = -r sum relu^(r-1) from a pass
   with w = r - 1 (for alpha = 2, the support count). Steps leaving the bracket (kept from the signs of
   log f) fall back to bisection;
3. stop when |log f(tau)| <= ``tol`` on every row (or after ``n_iter`` Newton steps, with a warning). The
   pass with w = r that checks convergence is also the output: FlexAttention's softmax of that score_mod is
   p_j / sum_j p_j, i.e. alpha-entmax restricted to the predicted pairs (the normalisation removes the residual
   of the sum). When the predicted graph contains the true support, this equals dense alpha-entmax.

Passes = 1 + (Newton steps) * 2 + 1, reported in :class:`EntmaxSolve`. On CUDA the passes use the shared
``torch.compile(flex_attention)``; on CPU flex_attention runs eagerly (slow, exact: tests in float64).

Backends (:data:`SPARSE_ENTMAX_BACKENDS`): ``flex`` is the above, the reference and the CPU path; ``triton``
(``kernels/entmax_triton.py``) fuses all passes into one kernel that recomputes QK^T of the kept tiles only,
with f and f' from one pass and, for alpha = 1.5 and 2, the exact step on the current support (passes =
1 + steps + 1, typically 4). ``backend='auto'`` takes triton on CUDA when triton imports and the mask comes
from :func:`block_mask_from_graph` (block a multiple of 16), else flex.
Causal masks (:func:`block_mask_from_graph` with ``causal=True``) keep the lower-triangular block graph, force
the diagonal tiles and apply a causal ``mask_mod`` inside them.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, NamedTuple, Optional

import torch
from torch import Tensor

from ..errors import ConfigError, ShapeError
from .blockmask import block_graph_to_kv
from .blockmask import token_to_block_graph as _token_to_block_graph
from .entmax_dense import check_entmax_inputs, dense_entmax_attention  # noqa: F401  (re-exported)
from .flex import compiled_flex_attention

__all__ = ["sparse_entmax_attention", "entmax_threshold", "block_mask_from_graph", "EntmaxSolve",
           "SPARSE_ENTMAX_BACKENDS", "resolve_sparse_backend", "triton_supports", "BlockCSR", "block_csr_from_graph",
           "dense_entmax_attention", "token_to_block_graph"]


def token_to_block_graph(graph: Tensor, block: int) -> Tensor:
    """(B, H, N, N) bool token graph -> (B, H, ceil(N/block), ceil(N/block)) block graph (last blocks padded)."""
    return _token_to_block_graph(graph, block, pad=True)

#: Temperature of the start pass: lse(BETA s)/BETA overestimates the row max by at most log(M)/BETA.
BETA = 1000.0


class EntmaxSolve(NamedTuple):
    """Result of the threshold solve: output (B, H, N, dv), tau (B, H, N), FlexAttention passes, Newton steps,
    and the largest |log f(tau)| over the non-empty rows (the tolerance actually reached)."""

    out: Tensor
    tau: Tensor
    passes: int
    steps: int
    residual: float


def _flex(device: torch.device):
    """flex_attention: compiled on CUDA (one shared compiled instance, see ``flex.compiled_flex_attention``), eager elsewhere."""
    from torch.nn.attention.flex_attention import flex_attention

    if device.type != "cuda":
        return flex_attention
    return compiled_flex_attention()


def _graph_mod(bg: Tensor, block: int, causal: bool, n: int):
    """mask_mod of the partial tiles: the block graph itself (so that eager FlexAttention, which evaluates the
    mask_mod on every pair, honours the block pattern too), and causality or the sequence tail."""
    B0, H0 = bg.shape[:2]

    def mask_mod(b, h, q_idx, kv_idx):  # noqa: ANN001
        keep = bg[b % B0, h % H0, q_idx // block, kv_idx // block]
        return keep & (q_idx >= kv_idx) if causal else keep & (kv_idx < n)

    mask_mod.attnlab_causal = causal  # type: ignore[attr-defined]  (read by the triton backend)
    return mask_mod


def _check_graph(block_graph: Tensor, block: int, seq_len: Optional[int], causal: bool) -> int:
    """Validate a (B, H, nq, nk) block graph for ``block`` and ``seq_len``; returns the sequence length."""
    if block_graph.dim() != 4:
        raise ShapeError(f"block graph must be (B, H, nq, nk); got {tuple(block_graph.shape)}")
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise ConfigError(f"block must be a positive int (got {block!r})")
    nq, nk = block_graph.shape[-2:]
    n = nq * block if seq_len is None else int(seq_len)
    if not (nq - 1) * block < n <= nq * block:
        raise ShapeError(f"seq_len {n} does not fit {nq} blocks of {block}")
    if causal and nq != nk:
        raise ShapeError(f"causal block masks need nq == nk (got {nq} and {nk})")
    return n


class BlockCSR(NamedTuple):
    """A block graph as the fused kernel reads it: per query block the number and the indices (ascending,
    left-aligned) of its kept kv blocks, as FlexAttention's ``kv_num_blocks``/``kv_indices``. Built from the
    graph with a handful of tensor ops (a FlexAttention ``BlockMask`` takes ~300); the flex backend turns it
    into a ``BlockMask`` with :func:`block_mask_from_graph` (``graph`` is kept for that)."""

    kv_num: Tensor  # (B, H, nq) int32
    kv_idx: Tensor  # (B, H, nq, nk) int32
    block: int
    seq_len: int
    causal: bool
    graph: Tensor  # (B, H, nq, nk) bool, as given


def block_csr_from_graph(block_graph: Tensor, block: int, seq_len: Optional[int] = None,
                         causal: bool = False) -> BlockCSR:
    """Block graph (B, H, nq, nk) -> :class:`BlockCSR`. ``causal``: blocks above the diagonal are dropped and
    the diagonal tiles kept (the kernel masks inside them), as in :func:`block_mask_from_graph`."""
    from .contracts import keep_mask

    block_graph = keep_mask(block_graph, "block_graph")
    n = _check_graph(block_graph, block, seq_len, causal)
    g = block_graph.bool()
    if causal:
        g = (g | torch.eye(g.shape[-1], dtype=torch.bool, device=g.device)).tril()
    kv_num = g.sum(-1, dtype=torch.int32)
    kv_idx = torch.argsort(g.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
    return BlockCSR(kv_num, kv_idx, block, n, bool(causal), block_graph)


def block_mask_from_graph(block_graph: Tensor, block: int, seq_len: Optional[int] = None,
                          causal: bool = False) -> Any:
    """Block graph (B, H, nq, nk) -> FlexAttention ``BlockMask`` (via ``from_kv_blocks``; no mask evaluation).

    ``causal``: blocks above the diagonal are dropped, the diagonal tiles are always kept (every query sees
    itself) and get a causal ``mask_mod``; the rest are full tiles. ``seq_len`` not a multiple of ``block``:
    the tail of the last block is masked (causal: implied by the causal mask)."""
    from torch.nn.attention.flex_attention import BlockMask

    from .contracts import keep_mask

    block_graph = keep_mask(block_graph, "block_graph")  # bool, 0/1 or an additive float mask (0 keep, -inf drop)
    n = _check_graph(block_graph, block, seq_len, causal)
    nq, nk = block_graph.shape[-2:]
    bg = block_graph.bool()
    if causal:
        bg = bg | torch.eye(nq, dtype=torch.bool, device=bg.device)
        kv = block_graph_to_kv(bg, causal=True)
        return BlockMask.from_kv_blocks(kv.kv_num_blocks, kv.kv_indices, kv.full_kv_num_blocks,
                                        kv.full_kv_indices, BLOCK_SIZE=block,
                                        mask_mod=_graph_mod(bg, block, True, n), seq_lengths=(n, n))
    counts = bg.sum(-1).to(torch.int32)
    order = torch.argsort((~bg).to(torch.int8), dim=-1, stable=True).to(torch.int32)  # kept blocks first
    # eager FlexAttention (CPU) evaluates mask_mod on every pair and ignores the block lists: it needs the graph
    mask_mod = _graph_mod(bg, block, False, n) if n % block or bg.device.type != "cuda" else None
    kv_len = n if nq == nk else nk * block
    return BlockMask.from_kv_blocks(counts, order, BLOCK_SIZE=block, mask_mod=mask_mod, seq_lengths=(n, kv_len))


def _entmax_mod(tau: Tensor, knobs: Tensor, a1: float):
    """score_mod ``where(x > 0, w log x, -inf) + beta s`` with x = a1 s - tau_row and (w, beta) = knobs."""

    def entmax_mod(score, b, h, q_idx, kv_idx):  # noqa: ANN001
        x = score * a1 - tau[b, h, q_idx]
        return torch.where(x > 0, torch.log(x) * knobs[0], -float("inf")) + knobs[1] * score

    return entmax_mod


def _check_solver(n_iter: int, tol: float) -> None:
    if isinstance(n_iter, bool) or not isinstance(n_iter, int) or n_iter < 1:
        raise ConfigError(f"n_iter must be a positive int (maximum Newton steps; got {n_iter!r})")
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not 0.0 < float(tol) < 1.0:
        raise ConfigError(f"tol must be in (0, 1) (tolerance on |log sum_j p_j|; got {tol!r})")


def _flex_threshold(q: Tensor, k: Tensor, v: Tensor, block_mask: Any, alpha: float, scale: Optional[float],
                    n_iter: int, tol: float) -> EntmaxSolve:
    """The FlexAttention backend: one FlexAttention call per pass (module docstring); the reference path."""
    if isinstance(block_mask, BlockCSR):
        block_mask = block_mask_from_graph(block_mask.graph, block_mask.block, block_mask.seq_len, block_mask.causal)
    G = q.shape[1] // k.shape[1]
    a1, r = alpha - 1.0, 1.0 / (alpha - 1.0)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    dt = torch.float64 if q.dtype == torch.float64 else torch.float32
    M = k.shape[2]
    flex = _flex(q.device)
    tau = torch.full(q.shape[:3], -1e30, dtype=dt, device=q.device)
    knobs = torch.tensor([0.0, BETA], dtype=dt, device=q.device)
    mod = _entmax_mod(tau, knobs, a1)

    def run():
        return flex(q, k, v, score_mod=mod, block_mask=block_mask, scale=scale, enable_gqa=G > 1, return_lse=True)

    _, lse = run()
    m_hat = lse.to(dt) / BETA
    empty = ~torch.isfinite(m_hat)  # rows without any predicted key
    m_hat = m_hat.masked_fill(empty, 0.0)
    lo = a1 * (m_hat - math.log(M) / BETA) - 1.0
    hi = a1 * m_hat - M ** -a1
    tau.copy_(lo)
    passes, steps = 1, 0
    while True:
        knobs.copy_(torch.tensor([r, 0.0], dtype=dt))
        out, lse = run()
        passes += 1
        res = lse.to(dt)
        done = empty | (res.abs() <= tol)
        if steps == n_iter or bool(done.all()):
            break
        knobs.copy_(torch.tensor([r - 1.0, 0.0], dtype=dt))
        _, lse_d = run()  # log sum relu^(r-1) = log(-f'/r)
        passes += 1
        steps += 1
        lo = torch.where(res > 0, tau, lo)
        hi = torch.where(res < 0, tau, hi)
        f = res.exp()
        new = tau + (f - f.pow(1.0 - 1.0 / r)) * torch.exp(-lse_d.to(dt))  # Newton on f^(1/r) - 1
        new = torch.where(torch.isfinite(new) & (new >= lo) & (new <= hi), new, (lo + hi) / 2)
        tau.copy_(torch.where(done, tau, new))  # in place: the score_mod keeps reading the same buffer
    resid = float(res.abs().masked_fill(empty, 0.0).max()) if res.numel() else 0.0
    out = out.masked_fill(empty.unsqueeze(-1), 0.0)
    return EntmaxSolve(out, tau, passes, steps, resid)


def _mask_causal(block_mask: Any) -> Optional[bool]:
    """Whether a ``BlockMask`` from :func:`block_mask_from_graph` is causal (None: a mask_mod we cannot fuse)."""
    from torch.nn.attention.flex_attention import noop_mask

    if isinstance(block_mask, BlockCSR):
        return block_mask.causal
    mod = block_mask.mask_mod
    if mod is noop_mask or mod is None:
        return False
    return getattr(mod, "attnlab_causal", None)


def triton_supports(q: Tensor, block_mask: Any) -> bool:
    """True when the fused Triton kernel can run this call: CUDA (or TRITON_INTERPRET=1), triton importable,
    a :class:`BlockCSR` or a mask from :func:`block_mask_from_graph` (its mask_mod is the block graph +
    causal/tail, nothing else), square blocks that are a multiple of 16."""
    from .kernels.runtime import triton_can_run

    if not triton_can_run(q.device):
        return False
    qb, kb = (block_mask.block,) * 2 if isinstance(block_mask, BlockCSR) else block_mask.BLOCK_SIZE
    return _mask_causal(block_mask) is not None and qb == kb and qb % 16 == 0


def _triton_threshold(q: Tensor, k: Tensor, v: Tensor, block_mask: Any, alpha: float, scale: Optional[float],
                      n_iter: int, tol: float) -> EntmaxSolve:
    """The fused Triton backend (``kernels/entmax_triton.py``): one launch, passes over the kept tiles only."""
    if not triton_supports(q, block_mask):
        raise ConfigError("backend='triton' needs CUDA (or TRITON_INTERPRET=1), the triton package and a block "
                          "mask from block_mask_from_graph with a block size that is a multiple of 16")
    from .kernels.entmax_triton import entmax_block_sparse_fwd

    causal = bool(_mask_causal(block_mask))
    bm = block_mask
    if isinstance(bm, BlockCSR):
        res = entmax_block_sparse_fwd(q, k, v, bm.kv_num, bm.kv_idx, bm.block, alpha, scale, causal, n_iter, tol)
    else:
        full = bm.full_kv_num_blocks is not None
        res = entmax_block_sparse_fwd(q, k, v, bm.kv_num_blocks, bm.kv_indices, bm.BLOCK_SIZE[0], alpha, scale,
                                      causal, n_iter, tol, bm.full_kv_num_blocks if full else None,
                                      bm.full_kv_indices if full else None)
    stats = torch.stack([res.log_f.abs().max().float(), res.iters.max().float()]).tolist() if res.tau.numel() \
        else [0.0, 0.0]
    steps = int(stats[1])
    return EntmaxSolve(res.out, res.tau, steps + 2, steps, float(stats[0]))


#: Sparse entmax backends, by name: ``flex`` (FlexAttention passes, any device, the reference) and ``triton``
#: (one fused kernel; CUDA). ``backend='auto'`` picks triton when :func:`triton_supports` says so.
SPARSE_ENTMAX_BACKENDS = {"flex": _flex_threshold, "triton": _triton_threshold}


def resolve_sparse_backend(q: Tensor, block_mask: Any, backend: str = "auto") -> str:
    """'auto' -> 'triton' on CUDA with triton and a fusable mask, else 'flex'; a named backend is kept."""
    if backend not in ("auto", *SPARSE_ENTMAX_BACKENDS):
        raise ConfigError(f"backend must be auto or one of {sorted(SPARSE_ENTMAX_BACKENDS)} (got {backend!r})")
    if backend != "auto":
        return backend
    return "triton" if q.device.type == "cuda" and triton_supports(q, block_mask) else "flex"


def entmax_threshold(q: Tensor, k: Tensor, v: Tensor, block_mask: Any, alpha: float = 1.5,
                     scale: Optional[float] = None, n_iter: int = 12, tol: float = 1e-3,
                     backend: str = "auto") -> EntmaxSolve:
    """Threshold tau per row (B, H, N) over the pairs of ``block_mask`` and the entmax output, by safeguarded
    Newton (see the module docstring); ``tol`` bounds |log sum_j relu(z_j - tau)^r| on every row. ``backend``:
    a key of :data:`SPARSE_ENTMAX_BACKENDS` or 'auto'."""
    check_entmax_inputs(q, k, v, alpha)
    _check_solver(n_iter, tol)
    from .contracts import check_block_mask, check_scale

    if not isinstance(block_mask, BlockCSR):
        check_block_mask(block_mask, q, k)
    elif block_mask.kv_num.shape[0] not in (1, q.shape[0]) or block_mask.kv_num.shape[1] not in (1, q.shape[1]):
        raise ShapeError(f"block_mask is for batch {block_mask.kv_num.shape[0]}, heads {block_mask.kv_num.shape[1]}; "
                         f"q has batch {q.shape[0]}, heads {q.shape[1]} (a mask must have 1 or the same number of each)")
    check_scale(scale)
    name = resolve_sparse_backend(q, block_mask, backend)
    res = SPARSE_ENTMAX_BACKENDS[name](q, k, v, block_mask, float(alpha), scale, n_iter, tol)
    if res.residual > tol:
        warnings.warn(f"sparse entmax: |log sum p| = {res.residual:.2e} > tol {tol:g} after n_iter={n_iter} Newton "
                      "steps; raise n_iter", RuntimeWarning, stacklevel=3)
    return res


def sparse_entmax_attention(q: Tensor, k: Tensor, v: Tensor, block_mask: Any, alpha: float = 1.5,
                            scale: Optional[float] = None, n_iter: int = 12, tol: float = 1e-3,
                            return_info: bool = False, backend: str = "auto") -> tuple[Tensor, Tensor] | EntmaxSolve:
    """alpha-entmax attention restricted to ``block_mask``: q (B, H, N, d), k, v (B, Hkv, N, d) with Hkv
    dividing H (grouped-query attention). Returns (output, tau per row), or the whole :class:`EntmaxSolve`
    (pass count, residual) with ``return_info``. Causal attention is a causal ``block_mask``
    (``block_mask_from_graph(..., causal=True)``). ``block_mask`` may also be a :class:`BlockCSR`
    (:func:`block_csr_from_graph`: the cheap form for the triton backend). ``backend``: 'flex', 'triton' (fused kernel, CUDA) or 'auto'
    (triton on CUDA when it can run the mask, else flex)."""
    res = entmax_threshold(q, k, v, block_mask, alpha, scale, n_iter, tol, backend)
    return res if return_info else (res.out, res.tau)
