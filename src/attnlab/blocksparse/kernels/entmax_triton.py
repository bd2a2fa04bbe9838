"""Fused Triton forward of block-sparse alpha-entmax attention (causal or not, grouped-query attention).

One program owns ``BLOCK_M`` query rows of one head. It walks only the kv tiles its query block keeps -- a CSR
like FlexAttention's ``BlockMask`` (``kv_num_blocks`` / ``kv_indices``, optionally a second "full" list) --
and recomputes the scores of those tiles, ``QK^T``, in every pass (nothing N x N is stored):

1. max pass: the row max m of z = (alpha - 1) * scale * s over the kept pairs. It gives the bracket
   tau in [a1 m - 1, a1 m - C^-(alpha-1)] (C = the number of kept columns: f(a1 m - 1) >= 1 from the max
   term alone, f(tau) <= C (a1 m - tau)^r);
2. Newton passes: one pass gives both f(tau) = sum relu(z - tau)^r and S(tau) = sum relu(z - tau)^(r-1)
   (f' = -r S). The step is Newton on psi = f^(1/r) - 1, which is convex and decreasing (an r-norm), so from
   the left end of the bracket the iterates rise monotonically to the root; a step that leaves the bracket
   (kept from the signs of f - 1) or is not finite falls back to bisection. The loop stops when every row of
   the tile has |log f| <= tol, or after ``n_iter`` passes;
3. output pass: p = relu(z - tau)^r, out = (p @ V) / sum p (the normalisation removes the residual of the
   sum, as in the FlexAttention path), and log sum p per row (the residual actually reached).

So the passes are 1 + (Newton passes) + 1, in one launch. r = 2 (alpha = 1.5) and r = 1 (alpha = 2) avoid
transcendentals; other alpha use exp2/log2. Masks inside tiles: the causal diagonal (``CAUSAL``) and the
sequence tails (rows >= N, columns >= M) -- the tile lists carry the rest of the pattern, so this kernel
serves exactly the masks ``sparse_entmax.block_mask_from_graph`` builds.

On a machine without a GPU the same kernel runs in Triton's interpreter (``TRITON_INTERPRET=1`` set before
this module is imported), which is how the CPU tests check it against float64 ``entmax_bisect``.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from attnlab.errors import ConfigError, ShapeError

__all__ = ["TritonEntmax", "entmax_block_sparse_fwd", "kernel_config"]


class TritonEntmax(NamedTuple):
    """Output (B, H, N, dv) in v's dtype, tau (B, H, N) float32 (z units; +inf on rows without keys),
    log sum_j p_j per row (the residual; 0 on empty rows), Newton passes per program (B, H, programs)."""

    out: Tensor
    tau: Tensor
    log_f: Tensor
    iters: Tensor


@triton.jit
def _tile_scores(q, K, kv_base, kv_stride_n, kb, sub, rows, N, M, c,
                 QB: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, D_P: tl.constexpr,
                 CAUSAL: tl.constexpr, IEEE: tl.constexpr, ACC_DT: tl.constexpr):
    """z = c * q k^T of one (BLOCK_M, BLOCK_N) sub-tile of kv block ``kb``; masked pairs are -inf."""
    cols = kb * QB + sub * BLOCK_N + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, D_P)
    kmask = (cols[None, :] < M) & (dims[:, None] < D)
    kt = tl.load(K + kv_base + cols[None, :] * kv_stride_n + dims[:, None], mask=kmask, other=0.0)
    if IEEE:
        s = tl.dot(q, kt, input_precision="ieee", out_dtype=ACC_DT)
    else:
        s = tl.dot(q, kt, out_dtype=ACC_DT)
    z = s * c
    valid = (cols[None, :] < M) & (rows[:, None] < N)
    if CAUSAL:
        valid = valid & (cols[None, :] <= rows[:, None] + (M - N))
    return tl.where(valid, z, -float("inf")), cols


@triton.jit
def _powr(x, r, KIND: tl.constexpr):
    """x^r for x > 0 (0 elsewhere); KIND 1: r = 2, KIND 2: r = 1, KIND 0: any r >= 1."""
    pos = x > 0
    if KIND == 1:
        y = x * x
    elif KIND == 2:
        y = x
    else:
        y = tl.exp2(r * tl.log2(tl.where(pos, x, 1.0)))
    return tl.where(pos, y, 0.0)


@triton.jit
def _powr1(x, r, KIND: tl.constexpr):
    """x^(r-1) for x > 0 (0 elsewhere)."""
    pos = x > 0
    if KIND == 1:
        y = x
    elif KIND == 2:
        y = tl.full(x.shape, 1.0, x.dtype)
    else:
        y = tl.exp2((r - 1.0) * tl.log2(tl.where(pos, x, 1.0)))
    return tl.where(pos, y, 0.0)


@triton.jit
def _entmax_fwd(Q, K, V, OUT, TAU, LOGF, ITERS,
                NUM_A, IDX_A, NUM_B, IDX_B,
                c, r, n_iter, tol,
                N, M, H, G,
                sq_b, sq_h, sq_n, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, so_b, so_h, so_n,
                sna_b, sna_h, sna_q, sia_b, sia_h, sia_q,
                snb_b, snb_h, snb_q, sib_b, sib_h, sib_q,
                QB: tl.constexpr, HAS_B: tl.constexpr, CAUSAL: tl.constexpr, KIND: tl.constexpr,
                IEEE: tl.constexpr, F64: tl.constexpr,
                D: tl.constexpr, D_P: tl.constexpr, DV: tl.constexpr, DV_P: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    ACC_DT: tl.constexpr = tl.float64 if F64 else tl.float32
    SUBS: tl.constexpr = QB // BLOCK_N
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    hk = h // G
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    qblk = (pid_m * BLOCK_M) // QB
    dims = tl.arange(0, D_P)
    q = tl.load(Q + b * sq_b + h * sq_h + rows[:, None] * sq_n + dims[None, :],
                mask=(rows[:, None] < N) & (dims[None, :] < D), other=0.0)
    k_base = b * sk_b + hk * sk_h
    na = tl.load(NUM_A + b * sna_b + h * sna_h + qblk * sna_q)
    ia = IDX_A + b * sia_b + h * sia_h + qblk * sia_q
    nb = 0
    ib = IDX_B
    if HAS_B:
        nb = tl.load(NUM_B + b * snb_b + h * snb_h + qblk * snb_q)
        ib = IDX_B + b * sib_b + h * sib_h + qblk * sib_q
    n_tiles = na + nb

    # 1. row max over the kept pairs
    m = tl.full((BLOCK_M,), -float("inf"), ACC_DT)
    for j in range(0, n_tiles):
        if j < na:
            kb = tl.load(ia + j)
        else:
            kb = tl.load(ib + (j - na))
        for sub in tl.static_range(SUBS):
            z, cols = _tile_scores(q, K, k_base, sk_n, kb, sub, rows, N, M, c, QB, BLOCK_N, D, D_P, CAUSAL, IEEE,
                                   ACC_DT)
            m = tl.maximum(m, tl.max(z, axis=1))
    empty = m == -float("inf")
    m = tl.where(empty, 0.0, m)
    n_cols = tl.maximum(n_tiles * QB, 1).to(ACC_DT)
    lo = m - 1.0
    hi = m - tl.exp2(-(1.0 / r) * tl.log2(n_cols))  # m - C^-(alpha-1)
    t = lo

    # 2. safeguarded Newton on f^(1/r) - 1
    it = n_iter * 0
    done = n_iter * 0
    while (it < n_iter) & (done == 0):
        f = tl.zeros((BLOCK_M,), ACC_DT)
        s1 = tl.zeros((BLOCK_M,), ACC_DT)
        for j in range(0, n_tiles):
            if j < na:
                kb = tl.load(ia + j)
            else:
                kb = tl.load(ib + (j - na))
            for sub in tl.static_range(SUBS):
                z, cols = _tile_scores(q, K, k_base, sk_n, kb, sub, rows, N, M, c, QB, BLOCK_N, D, D_P, CAUSAL,
                                       IEEE, ACC_DT)
                x = z - t[:, None]
                f += tl.sum(_powr(x, r, KIND), axis=1)
                s1 += tl.sum(_powr1(x, r, KIND), axis=1)
        ok = empty | (tl.abs(tl.log(tl.where(f > 0, f, 1e-30))) <= tol)
        lo = tl.where(f > 1.0, t, lo)
        hi = tl.where(f < 1.0, t, hi)
        if KIND == 1:
            g = tl.sqrt(f)
        elif KIND == 2:
            g = tl.full(f.shape, 1.0, ACC_DT)
        else:
            g = tl.exp2((1.0 - 1.0 / r) * tl.log2(tl.where(f > 0, f, 1e-30)))
        new = t + (f - g) / tl.where(s1 > 0, s1, 1.0)
        good = (s1 > 0) & (new >= lo) & (new <= hi) & (new == new)
        new = tl.where(good, new, 0.5 * (lo + hi))
        t = tl.where(ok, t, new)
        done = tl.min(ok.to(tl.int32), axis=0)
        it += 1

    # 3. output
    acc = tl.zeros((BLOCK_M, DV_P), ACC_DT)
    f = tl.zeros((BLOCK_M,), ACC_DT)
    dvs = tl.arange(0, DV_P)
    v_base = b * sv_b + hk * sv_h
    for j in range(0, n_tiles):
        if j < na:
            kb = tl.load(ia + j)
        else:
            kb = tl.load(ib + (j - na))
        for sub in tl.static_range(SUBS):
            z, cols = _tile_scores(q, K, k_base, sk_n, kb, sub, rows, N, M, c, QB, BLOCK_N, D, D_P, CAUSAL, IEEE,
                                   ACC_DT)
            p = _powr(z - t[:, None], r, KIND)
            f += tl.sum(p, axis=1)
            vt = tl.load(V + v_base + cols[:, None] * sv_n + dvs[None, :],
                         mask=(cols[:, None] < M) & (dvs[None, :] < DV), other=0.0)
            if IEEE:
                acc += tl.dot(p.to(vt.dtype), vt, input_precision="ieee", out_dtype=ACC_DT)
            else:
                acc += tl.dot(p.to(vt.dtype), vt, out_dtype=ACC_DT)
    fs = tl.where(empty, 1.0, f)
    out = acc / fs[:, None]
    out = tl.where(empty[:, None], 0.0, out)
    rmask = rows < N
    tl.store(OUT + b * so_b + h * so_h + rows[:, None] * so_n + dvs[None, :], out.to(OUT.dtype.element_ty),
             mask=rmask[:, None] & (dvs[None, :] < DV))
    row_off = (b * H + h) * N + rows
    tl.store(TAU + row_off, tl.where(empty, float("inf"), t).to(tl.float32), mask=rmask)
    tl.store(LOGF + row_off, tl.where(empty, 0.0, tl.log(tl.where(f > 0, f, 1e-30))).to(tl.float32), mask=rmask)
    tl.store(ITERS + (b * H + h) * tl.num_programs(0) + pid_m, it)


def _pow2_divisor(n: int, cap: int) -> int:
    """Largest power of two <= cap dividing n."""
    p = 1
    while p * 2 <= cap and n % (p * 2) == 0:
        p *= 2
    return p


def kernel_config(block: int, d: int, dtype: torch.dtype, on_gpu: bool) -> dict:
    """Tile sizes for graph block ``block``: BLOCK_M, BLOCK_N powers of two dividing it (>= 16, tl.dot), warps."""
    big = 128 if dtype in (torch.bfloat16, torch.float16) else 64
    bm = _pow2_divisor(block, big if on_gpu else 32)
    bn = _pow2_divisor(block, 64 if on_gpu else 32)
    if bm < 16 or bn < 16:
        raise ConfigError(f"the triton entmax backend needs a block size that is a multiple of 16 (got {block})")
    warps = 8 if (bm >= 128 and on_gpu) else 4
    return {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": warps, "num_stages": 2 if on_gpu else 1}


def _strides3(t: Tensor) -> tuple[int, int, int]:
    """(b, h, q) strides of a (B0, H0, nq[, ...]) tensor, 0 along broadcast (size-1) dims."""
    return tuple(0 if t.shape[i] == 1 else t.stride(i) for i in range(3))  # type: ignore[return-value]


def entmax_block_sparse_fwd(q: Tensor, k: Tensor, v: Tensor, kv_num: Tensor, kv_idx: Tensor, block: int,
                            alpha: float = 1.5, scale: Optional[float] = None, causal: bool = False,
                            n_iter: int = 12, tol: float = 1e-3, full_num: Optional[Tensor] = None,
                            full_idx: Optional[Tensor] = None, config: Optional[dict] = None) -> TritonEntmax:
    """Block-sparse alpha-entmax attention, fused: q (B, H, N, d), k (B, Hkv, M, d), v (B, Hkv, M, dv), Hkv | H.

    ``kv_num`` (B0, H0, nq) int and ``kv_idx`` (B0, H0, nq, >= max count) int: the kept kv blocks per query
    block (B0, H0 in {1, B/H}: broadcast); ``full_num``/``full_idx`` a second list of the same form (FlexAttention
    keeps full and partial tiles apart; here both are treated alike). ``causal``: query i sees key j <= i + M - N.
    ``config``: BLOCK_M, BLOCK_N, num_warps, num_stages (default :func:`kernel_config`)."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ShapeError(f"q, k, v must be 4-d (B, H, N, d); got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    B, H, N, d = q.shape
    Hkv, M = k.shape[1], k.shape[2]
    if H % Hkv or v.shape[:3] != k.shape[:3] or k.shape[-1] != d:
        raise ShapeError(f"k, v must be (B, Hkv, M, d) with Hkv dividing H; got {tuple(k.shape)}, {tuple(v.shape)}")
    if not 1.0 < float(alpha) <= 2.0:
        raise ConfigError(f"alpha must be in (1, 2] (got {alpha!r})")
    nq = -(-N // block)
    if kv_num.dim() != 3 or kv_num.shape[-1] != nq or kv_idx.dim() != 4:
        raise ShapeError(f"kv_num must be (B, H, {nq}) and kv_idx (B, H, {nq}, nk) for {N} queries in blocks of "
                         f"{block}; got {tuple(kv_num.shape)}, {tuple(kv_idx.shape)}")
    if causal and N > M:
        raise ShapeError(f"causal entmax needs at least as many keys as queries (got {N} queries, {M} keys)")
    a1 = float(alpha) - 1.0
    r = 1.0 / a1
    kind = 1 if float(alpha) == 1.5 else 2 if float(alpha) == 2.0 else 0
    scale = d ** -0.5 if scale is None else float(scale)
    on_gpu = q.is_cuda
    cfg = dict(kernel_config(block, d, q.dtype, on_gpu), **(config or {}))
    bm, bn = cfg.pop("BLOCK_M"), cfg.pop("BLOCK_N")
    if block % bm or block % bn:
        raise ConfigError(f"BLOCK_M={bm} and BLOCK_N={bn} must divide the block size {block}")
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    out = torch.empty(B, H, N, v.shape[-1], dtype=v.dtype, device=q.device)
    tau = torch.empty(B, H, N, dtype=torch.float32, device=q.device)
    log_f = torch.empty_like(tau)
    progs = triton.cdiv(N, bm)
    iters = torch.empty(B, H, progs, dtype=torch.int32, device=q.device)
    kv_num, kv_idx = kv_num.to(torch.int32).contiguous(), kv_idx.to(torch.int32).contiguous()
    has_b = full_num is not None
    if has_b:
        full_num, full_idx = full_num.to(torch.int32).contiguous(), full_idx.to(torch.int32).contiguous()
    else:
        full_num, full_idx = kv_num, kv_idx
    f64 = q.dtype == torch.float64
    ieee = q.dtype in (torch.float32, torch.float64)
    _entmax_fwd[(progs, H, B)](
        q, k, v, out, tau, log_f, iters, kv_num, kv_idx, full_num, full_idx,
        a1 * scale, r, int(n_iter), float(tol), N, M, H, H // Hkv,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        *_strides3(kv_num), *_strides3(kv_idx), *_strides3(full_num), *_strides3(full_idx),
        QB=block, HAS_B=has_b, CAUSAL=bool(causal), KIND=kind, IEEE=ieee, F64=f64,
        D=d, D_P=max(16, triton.next_power_of_2(d)), DV=v.shape[-1], DV_P=max(16, triton.next_power_of_2(v.shape[-1])),
        BLOCK_M=bm, BLOCK_N=bn, **cfg)
    return TritonEntmax(out, tau, log_f, iters)

