"""Fused Triton statistics of MInference's vertical-slash estimate: no N-long probability rows in float32 memory.

The estimate needs, per query head, three reductions of the softmax probabilities of a few query rows (the
``L`` last queries and the ``R`` recall-check rows, all causal):

* vertical[j]  = sum over the last rows of p[r, j]                 (column sums, natural key order);
* slash[o]     = sum over the last rows of p[r, pos_r - o]         (diagonal sums, offset o = query - key);
* mass[r', b]  = sum over the keys of block b of p[r', j]          (exact block mass of the check rows).

Two launches: ``_row_stats`` computes each row's max and sum of exp (online, split over key ranges so a short
row set still fills the GPU; the splits are combined in torch), then ``_reduce`` recomputes one key tile of
scores per program, normalises, and writes the column sums and block masses directly. For the diagonal sums
each last row r is stored shifted right by ``L - 1 - r`` columns into a zeroed (B, H, L, N) float32 buffer: row
r's key j lands in column j + L - 1 - r = N - 1 - o, so the slash sums are plain column sums of that buffer
(read once, in torch). Bytes: q rows and k once per pass, plus that buffer (B H L N x 4 B: 0.27 GB at 32 heads and
32k) -- against ~4 GB of float32 traffic in the eager path. Scores are ``tl.dot`` of the input dtype with a float32
accumulator (exact products for bf16/fp16, as the eager path's TF32; ``ieee`` for float32/float64 inputs).

Without CUDA the kernels run in Triton's interpreter (``TRITON_INTERPRET=1`` before import), which is how the CPU
tests compare them with the eager float64 path.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from attnlab.errors import ShapeError

__all__ = ["vs_stats_triton"]


@triton.jit
def _load_rows(Q, q_base, stride_qr, rows, rmask, D: tl.constexpr, D_P: tl.constexpr):
    """The row set's queries (BLOCK_R, D_P); padding rows and columns read zeros."""
    dd = tl.arange(0, D_P)
    return tl.load(Q + q_base + rows[:, None] * stride_qr + dd[None, :], mask=rmask[:, None] & (dd[None, :] < D),
                   other=0.0)


@triton.jit
def _scores(q, K, k_base, stride_kn, cols, N, scale, D: tl.constexpr, D_P: tl.constexpr, IEEE: tl.constexpr):
    """scale * q k^T of the row set against one key tile (float32; keys past N read zeros)."""
    dd = tl.arange(0, D_P)
    k = tl.load(K + k_base + cols[:, None] * stride_kn + dd[None, :], mask=(cols[:, None] < N) & (dd[None, :] < D),
                other=0.0)
    if IEEE:
        s = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k))
    return s.to(tl.float32) * scale


@triton.jit
def _row_stats(Q, K, POS, M_OUT, L_OUT, stride_qb, stride_qh, stride_qr, stride_kb, stride_kh, stride_kn,
               N, LR, keys_per_split, n_split, scale, iters: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr, D_P: tl.constexpr,
               BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr):
    """Per (split, head, batch): running max and sum of exp of the causal scores of every row over one key range."""
    split, h, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = tl.arange(0, BLOCK_R)
    rmask = rows < LR
    pos = tl.load(POS + rows, mask=rmask, other=-1)
    q = _load_rows(Q, b * stride_qb + h * stride_qh, stride_qr, rows, rmask, D, D_P)
    k_base = b * stride_kb + (h // GROUP) * stride_kh
    m = tl.full([BLOCK_R], float("-inf"), tl.float32)
    acc = tl.zeros([BLOCK_R], tl.float32)
    start = split * keys_per_split
    for it in range(0, iters):
        cols = start + it * BLOCK_N + tl.arange(0, BLOCK_N)
        s = _scores(q, K, k_base, stride_kn, cols, N, scale, D, D_P, IEEE)
        s = tl.where((cols[None, :] <= pos[:, None]) & (cols[None, :] < N), s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        acc = acc * tl.exp(m - m_ref) + tl.sum(tl.exp(s - m_ref[:, None]), 1)
        m = m_new
    out = ((b * tl.num_programs(1) + h) * n_split + split) * BLOCK_R + rows
    tl.store(M_OUT + out, m, mask=rmask)
    tl.store(L_OUT + out, acc, mask=rmask)


@triton.jit
def _reduce(Q, K, POS, M, LSUM, VERT, SHIFT, MASS, stride_qb, stride_qh, stride_qr, stride_kb, stride_kh,
            stride_kn, N, LR, L, n_blocks, scale, GROUP: tl.constexpr, D: tl.constexpr, D_P: tl.constexpr,
            BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr):
    """Per (key tile, head, batch): normalised probabilities of the row set; column sums over the last rows,
    their shifted copies (for the diagonal sums), and the block mass of the check rows."""
    t, h, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    H = tl.num_programs(1)
    rows = tl.arange(0, BLOCK_R)
    rmask = rows < LR
    pos = tl.load(POS + rows, mask=rmask, other=-1)
    bh = b * H + h
    m = tl.load(M + bh * BLOCK_R + rows, mask=rmask, other=0.0)
    lsum = tl.load(LSUM + bh * BLOCK_R + rows, mask=rmask, other=1.0)
    cols = t * BLOCK_N + tl.arange(0, BLOCK_N)
    q = _load_rows(Q, b * stride_qb + h * stride_qh, stride_qr, rows, rmask, D, D_P)
    s = _scores(q, K, b * stride_kb + (h // GROUP) * stride_kh, stride_kn, cols, N, scale, D, D_P, IEEE)
    ok = (cols[None, :] <= pos[:, None]) & (cols[None, :] < N) & rmask[:, None]
    p = tl.where(ok, tl.exp(s - m[:, None]) / lsum[:, None], 0.0)
    last = rows < L
    tl.store(VERT + bh * N + cols, tl.sum(tl.where(last[:, None], p, 0.0), 0), mask=cols < N)
    shifted = cols[None, :] + (L - 1 - rows[:, None])
    tl.store(SHIFT + (bh * L + rows[:, None]) * N + shifted, p, mask=last[:, None] & ok & (shifted < N))
    check = (rows >= L) & rmask
    tl.store(MASS + (bh * (LR - L) + (rows - L)) * n_blocks + t, tl.sum(p, 1), mask=check)


def _combine(m: Tensor, acc: Tensor) -> tuple[Tensor, Tensor]:
    """Row max and sum of exp over the key splits (B, H, S, R) -> (B, H, R) each."""
    top = m.amax(2)
    ref = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    return top.contiguous(), (acc * torch.exp(m - ref.unsqueeze(2))).sum(2).contiguous()


def vs_stats_triton(q_rows: Tensor, k_heads: Tensor, pos: Tensor, last: int, scale: float, group: int,
                    block_size: int, n_split: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """q_rows (B, H, L+R, D): the last ``last`` query rows then the check rows, at positions ``pos`` (L+R,);
    k_heads (B, H // group, N, D) in natural key order (last dim contiguous). Returns float32 vertical (B, H, N),
    slash (B, H, N) (index = offset query - key) and the check rows' block mass (B, H, R, N // block_size)."""
    B, H, LR, D = q_rows.shape
    N = k_heads.shape[2]
    if k_heads.shape[1] * group != H or N % block_size or block_size & (block_size - 1):
        raise ShapeError(f"q rows {tuple(q_rows.shape)}, keys {tuple(k_heads.shape)}, group {group}, block "
                         f"{block_size}: need H = key heads x group and N a multiple of a power-of-two block")
    if q_rows.stride(-1) != 1 or k_heads.stride(-1) != 1:
        raise ShapeError("q rows and keys need a contiguous last dimension")
    dev = q_rows.device
    block_r, d_p = max(16, triton.next_power_of_2(LR)), max(16, triton.next_power_of_2(D))
    ieee = q_rows.dtype in (torch.float32, torch.float64)
    if n_split <= 0:  # enough programs for the first pass: ~2 per SM on a GPU
        sms = torch.cuda.get_device_properties(dev).multi_processor_count if dev.type == "cuda" else 1
        n_split = max(1, min(N // block_size, -(-2 * sms // (B * H))))
    per = -(-(N // block_size) // n_split) * block_size
    n_split = -(-N // per)
    pos32 = pos.to(dev, torch.int32).contiguous()
    f32 = dict(dtype=torch.float32, device=dev)
    m_s, l_s = torch.empty(B, H, n_split, block_r, **f32), torch.empty(B, H, n_split, block_r, **f32)
    strides = (*q_rows.stride()[:3], *k_heads.stride()[:3])
    common = dict(GROUP=group, D=D, D_P=d_p, BLOCK_R=block_r, BLOCK_N=block_size, IEEE=ieee, num_warps=8)
    _row_stats[(n_split, H, B)](q_rows, k_heads, pos32, m_s, l_s, *strides, N, LR, per, n_split, scale, per // block_size,
                                **common)
    m, lsum = _combine(m_s, l_s)
    nb = N // block_size
    vert = torch.empty(B, H, N, **f32)
    shift = torch.zeros(B, H, last, N, **f32)
    mass = torch.empty(B, H, LR - last, nb, **f32)
    _reduce[(nb, H, B)](q_rows, k_heads, pos32, m, lsum, vert, shift, mass, *strides, N, LR, last, nb, scale,
                        **common)
    return vert, shift.sum(2).flip(-1), mass
