"""Fused Triton forward of block-sparse alpha-entmax attention (causal or not, grouped-query attention).

One program owns ``BLOCK_M`` query rows of one head. It walks only the kv tiles its query block keeps -- a CSR
like FlexAttention's ``BlockMask`` (``kv_num_blocks`` / ``kv_indices``, optionally a second "full" list) --
and recomputes the scores of those tiles, ``QK^T``, in every pass (nothing N x N is stored):

1. max pass: the row max m of z = (alpha - 1) * scale * s over the kept pairs. It gives the bracket
   tau in [a1 m - 1, a1 m - C^-(alpha-1)] (C = the number of kept columns: f(a1 m - 1) >= 1 from the max
   term alone, f(tau) <= C (a1 m - tau)^r);
2. step passes: one pass gives f(tau) = sum relu(z - tau)^r, S(tau) = sum relu(z - tau)^(r-1) (f' = -r S)
   and, for alpha = 1.5, the support size n. alpha = 1.5: the exact step on the current support, the smaller
   root d of sum_S (x_j - d)^2 = 1 (from the left of the root it lands right of it or on it, from the right
   left of it or on it -- so it is also a bound -- and it is exact once the support is final, which is what
   AdaSplash-2's histogram step computes per bin); alpha = 2: the same, linear; other alpha: Newton on
   psi = f^(1/r) - 1, convex and decreasing (an r-norm), so from the left end of the bracket the iterates rise
   monotonically to the root. A step that leaves the bracket (kept from the signs of f - 1 and the bounds
   above) or is not finite falls back to bisection. The loop stops when every row of the tile has
   |log f| <= tol, or after ``n_iter`` passes;
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
                 CAUSAL: tl.constexpr, MASKED: tl.constexpr, IEEE: tl.constexpr, ACC_DT: tl.constexpr):
    """z = c * q k^T of one (BLOCK_M, BLOCK_N) sub-tile of kv block ``kb``. ``MASKED``: pairs past the key tail
    (and, causal, in the future) are -inf; unmasked tiles are the causal lists' full tiles (below the diagonal)."""
    cols = kb * QB + sub * BLOCK_N + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, D_P)
    ptrs = K + kv_base + cols[None, :] * kv_stride_n + dims[:, None]
    if MASKED:
        kmask = cols[None, :] < M
        if D_P != D:
            kmask = kmask & (dims[:, None] < D)
        kt = tl.load(ptrs, mask=kmask, other=0.0)
    elif D_P != D:
        kt = tl.load(ptrs, mask=dims[:, None] < D, other=0.0)
    else:
        kt = tl.load(ptrs)
    if IEEE:
        s = tl.dot(q, kt, input_precision="ieee", out_dtype=ACC_DT)
    else:
        s = tl.dot(q, kt, out_dtype=ACC_DT)
    z = s * c
    if MASKED:
        valid = cols[None, :] < M
        if CAUSAL:
            valid = valid & (cols[None, :] <= rows[:, None] + (M - N))
        z = tl.where(valid, z, -float("inf"))
    return z, cols


@triton.jit
def _powr(x, r, KIND: tl.constexpr):
    """relu(x)^r; KIND 1: r = 2, KIND 2: r = 1, KIND 0: any r >= 1 (exp2/log2; log2(0) = -inf gives 0)."""
    xr = tl.maximum(x, 0.0)
    if KIND == 1:
        y = xr * xr
    elif KIND == 2:
        y = xr
    else:
        y = tl.exp2(r * tl.log2(xr))
    return y


@triton.jit
def _powr1(x, r, KIND: tl.constexpr):
    """relu(x)^(r-1) (the support indicator for r = 1)."""
    if KIND == 1:
        y = tl.maximum(x, 0.0)
    elif KIND == 2:
        y = (x > 0).to(x.dtype)
    else:
        y = tl.exp2((r - 1.0) * tl.log2(tl.maximum(x, 0.0)))
    return y


@triton.jit
def _max_list(m, q, K, k_base, sk_n, idx, cnt, rows, N, M, c,
              QB: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, D_P: tl.constexpr, CAUSAL: tl.constexpr,
              MASKED: tl.constexpr, IEEE: tl.constexpr, ACC_DT: tl.constexpr):
    """Row max of z over the ``cnt`` kv blocks listed at ``idx``."""
    for j in range(0, cnt):
        kb = tl.load(idx + j)
        for sub in tl.static_range(QB // BLOCK_N):
            z, cols = _tile_scores(q, K, k_base, sk_n, kb, sub, rows, N, M, c, QB, BLOCK_N, D, D_P, CAUSAL, MASKED,
                                   IEEE, ACC_DT)
            m = tl.maximum(m, tl.max(z, axis=1))
    return m


@triton.jit
def _stats_list(f, s1, n0, xin, xout, t, r, q, K, k_base, sk_n, idx, cnt, rows, N, M, c,
                QB: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, D_P: tl.constexpr, CAUSAL: tl.constexpr,
                MASKED: tl.constexpr, KIND: tl.constexpr, IEEE: tl.constexpr, ACC_DT: tl.constexpr):
    """f += sum relu(z - t)^r, s1 += sum relu(z - t)^(r-1); alpha 1.5 and 2 also n0 (support size), xin (least
    x = z - t in the support) and xout (largest x outside it), which tell whether the exact step keeps the
    support."""
    for j in range(0, cnt):
        kb = tl.load(idx + j)
        for sub in tl.static_range(QB // BLOCK_N):
            z, cols = _tile_scores(q, K, k_base, sk_n, kb, sub, rows, N, M, c, QB, BLOCK_N, D, D_P, CAUSAL, MASKED,
                                   IEEE, ACC_DT)
            x = z - t[:, None]
            if KIND == 0:
                f += tl.sum(_powr(x, r, KIND), axis=1)
                s1 += tl.sum(_powr1(x, r, KIND), axis=1)
            else:
                pos = x > 0
                xr = tl.maximum(x, 0.0)
                if KIND == 1:
                    f += tl.sum(xr * xr, axis=1)
                    s1 += tl.sum(xr, axis=1)
                    n0 += tl.sum(pos.to(ACC_DT), axis=1)
                else:
                    f += tl.sum(xr, axis=1)
                    s1 += tl.sum(pos.to(ACC_DT), axis=1)
                xin = tl.minimum(xin, tl.min(tl.where(pos, x, float("inf")), axis=1))
                xout = tl.maximum(xout, tl.max(tl.where(pos, -float("inf"), x), axis=1))
    return f, s1, n0, xin, xout


@triton.jit
def _out_list(acc, f, t, r, q, K, V, k_base, v_base, sk_n, sv_n, idx, cnt, rows, N, M, c,
              QB: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, D_P: tl.constexpr, DV: tl.constexpr,
              DV_P: tl.constexpr, CAUSAL: tl.constexpr, MASKED: tl.constexpr, KIND: tl.constexpr,
              IEEE: tl.constexpr, ACC_DT: tl.constexpr):
    """acc += relu(z - t)^r @ V, f += sum relu(z - t)^r."""
    dvs = tl.arange(0, DV_P)
    for j in range(0, cnt):
        kb = tl.load(idx + j)
        for sub in tl.static_range(QB // BLOCK_N):
            z, cols = _tile_scores(q, K, k_base, sk_n, kb, sub, rows, N, M, c, QB, BLOCK_N, D, D_P, CAUSAL, MASKED,
                                   IEEE, ACC_DT)
            p = _powr(z - t[:, None], r, KIND)
            f += tl.sum(p, axis=1)
            vptrs = V + v_base + cols[:, None] * sv_n + dvs[None, :]
            if MASKED:
                vmask = cols[:, None] < M
                if DV_P != DV:
                    vmask = vmask & (dvs[None, :] < DV)
                vt = tl.load(vptrs, mask=vmask, other=0.0)
            elif DV_P != DV:
                vt = tl.load(vptrs, mask=dvs[None, :] < DV, other=0.0)
            else:
                vt = tl.load(vptrs)
            if IEEE:
                acc += tl.dot(p.to(vt.dtype), vt, input_precision="ieee", out_dtype=ACC_DT)
            else:
                acc += tl.dot(p.to(vt.dtype), vt, out_dtype=ACC_DT)
    return acc, f


@triton.jit
def _entmax_fwd(Q, K, V, OUT, TAU, LOGF, ITERS,
                NUM_A, IDX_A, NUM_B, IDX_B,
                c, r, n_iter, tol,
                N, M, H, G,
                sq_b, sq_h, sq_n, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, so_b, so_h, so_n,
                sna_b, sna_h, sna_q, sia_b, sia_h, sia_q,
                snb_b, snb_h, snb_q, sib_b, sib_h, sib_q,
                QB: tl.constexpr, HAS_B: tl.constexpr, CAUSAL: tl.constexpr, KIND: tl.constexpr,
                IEEE: tl.constexpr, F64: tl.constexpr, EXACT_STOP: tl.constexpr,
                D: tl.constexpr, D_P: tl.constexpr, DV: tl.constexpr, DV_P: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    ACC_DT: tl.constexpr = tl.float64 if F64 else tl.float32
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
    v_base = b * sv_b + hk * sv_h
    # list A: partial tiles (masked: causal diagonal, key tail); list B: full tiles (causal lists only)
    na = tl.load(NUM_A + b * sna_b + h * sna_h + qblk * sna_q)
    ia = IDX_A + b * sia_b + h * sia_h + qblk * sia_q
    nb = na * 0
    ib = IDX_B
    if HAS_B:
        nb = tl.load(NUM_B + b * snb_b + h * snb_h + qblk * snb_q)
        ib = IDX_B + b * sib_b + h * sib_h + qblk * sib_q

    # 1. row max over the kept pairs -> bracket
    m = tl.full((BLOCK_M,), -float("inf"), ACC_DT)
    m = _max_list(m, q, K, k_base, sk_n, ia, na, rows, N, M, c, QB, BLOCK_N, D, D_P, CAUSAL, True, IEEE, ACC_DT)
    if HAS_B:
        m = _max_list(m, q, K, k_base, sk_n, ib, nb, rows, N, M, c, QB, BLOCK_N, D, D_P, CAUSAL, False, IEEE,
                      ACC_DT)
    empty = m == -float("inf")
    m = tl.where(empty, 0.0, m)
    n_cols = tl.maximum((na + nb) * QB, 1).to(ACC_DT)
    lo = m - 1.0
    hi = m - tl.exp2(-(1.0 / r) * tl.log2(n_cols))  # m - C^-(alpha-1)
    t = lo

    # 2. safeguarded steps: alpha 1.5 the exact step on the current support (a root of a quadratic), else
    #    Newton on f^(1/r) - 1; bisection when a step leaves the bracket
    it = n_iter * 0
    done = n_iter * 0
    while (it < n_iter) & (done == 0):
        f = tl.zeros((BLOCK_M,), ACC_DT)
        s1 = tl.zeros((BLOCK_M,), ACC_DT)
        n0 = tl.zeros((BLOCK_M,), ACC_DT)
        xin = tl.full((BLOCK_M,), float("inf"), ACC_DT)
        xout = tl.full((BLOCK_M,), -float("inf"), ACC_DT)
        f, s1, n0, xin, xout = _stats_list(f, s1, n0, xin, xout, t, r, q, K, k_base, sk_n, ia, na, rows, N, M, c,
                                           QB, BLOCK_N, D, D_P, CAUSAL, True, KIND, IEEE, ACC_DT)
        if HAS_B:
            f, s1, n0, xin, xout = _stats_list(f, s1, n0, xin, xout, t, r, q, K, k_base, sk_n, ib, nb, rows, N, M,
                                               c, QB, BLOCK_N, D, D_P, CAUSAL, False, KIND, IEEE, ACC_DT)
        ok = empty | (tl.abs(tl.log(tl.where(f > 0, f, 1e-30))) <= tol)
        exact = ok & False  # set by the alpha 1.5 / 2 steps below
        lo = tl.where(f > 1.0, t, lo)
        hi = tl.where(f < 1.0, t, hi)
        if KIND == 1:
            # sum_{support at t} (x_j - d)^2 = 1, smaller root d = (f - 1) / (s1 + sqrt(s1^2 - n0 (f - 1))):
            # from the left (f > 1) t + d >= tau (an upper bound), from the right t + d <= tau (a lower bound);
            # exact once the support is the final one
            disc = s1 * s1 - n0 * (f - 1.0)
            qok = (disc >= 0) & (s1 > 0)
            new = t + (f - 1.0) / tl.where(qok, s1 + tl.sqrt(tl.maximum(disc, 0.0)), 1.0)
            hi = tl.where(qok & (f > 1.0), tl.minimum(hi, new), hi)
            lo = tl.where(qok & (f < 1.0), tl.maximum(lo, new), lo)
            newton = t + (f - tl.sqrt(f)) / tl.where(s1 > 0, s1, 1.0)
            exact = qok & (new - t <= xin) & (new - t >= xout)  # the support at t is the support at new
            new = tl.where(qok, new, newton)
        elif KIND == 2:
            new = t + (f - 1.0) / tl.where(s1 > 0, s1, 1.0)
            exact = (s1 > 0) & (new - t <= xin) & (new - t >= xout)
        else:
            g = tl.exp2((1.0 - 1.0 / r) * tl.log2(tl.where(f > 0, f, 1e-30)))
            new = t + (f - g) / tl.where(s1 > 0, s1, 1.0)
        good = (s1 > 0) & (new >= lo) & (new <= hi) & (new == new)
        new = tl.where(good, new, 0.5 * (lo + hi))
        t = tl.where(ok, t, new)
        if EXACT_STOP:  # an exact step on an unchanged support solves f = 1: no pass to confirm it
            ok = ok | (exact & good)
        done = tl.min(ok.to(tl.int32), axis=0)
        it += 1

    # 3. output
    acc = tl.zeros((BLOCK_M, DV_P), ACC_DT)
    f = tl.zeros((BLOCK_M,), ACC_DT)
    acc, f = _out_list(acc, f, t, r, q, K, V, k_base, v_base, sk_n, sv_n, ia, na, rows, N, M, c, QB, BLOCK_N, D,
                       D_P, DV, DV_P, CAUSAL, True, KIND, IEEE, ACC_DT)
    if HAS_B:
        acc, f = _out_list(acc, f, t, r, q, K, V, k_base, v_base, sk_n, sv_n, ib, nb, rows, N, M, c, QB, BLOCK_N,
                           D, D_P, DV, DV_P, CAUSAL, False, KIND, IEEE, ACC_DT)
    fs = tl.where(empty, 1.0, f)
    out = acc / fs[:, None]
    out = tl.where(empty[:, None], 0.0, out)
    rmask = rows < N
    dvs = tl.arange(0, DV_P)
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
    bm = _pow2_divisor(block, 64 if on_gpu else 32)
    bn = _pow2_divisor(block, 64 if on_gpu else 32)
    if bm < 16 or bn < 16:
        raise ConfigError(f"the triton entmax backend needs a block size that is a multiple of 16 (got {block})")
    # H200, N = 16k causal, d = 64, bf16 (benchmarks/NOTES-sparse-entmax.md): 64x64/4 warps 0.554 ms,
    # 128x64/8 warps 0.621, 128x64/4 warps/3 stages 0.786, 128x128/8 warps 0.806
    return {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": 4, "num_stages": 2 if on_gpu else 1}


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
        EXACT_STOP=kind > 0 and (f64 or float(tol) >= 1e-5),
        D=d, D_P=max(16, triton.next_power_of_2(d)), DV=v.shape[-1], DV_P=max(16, triton.next_power_of_2(v.shape[-1])),
        BLOCK_M=bm, BLOCK_N=bn, **cfg)
    return TritonEntmax(out, tau, log_f, iters)

