"""Fused Triton block-sparse entmax (``kernels/entmax_triton.py``) against float64 ``entmax_bisect`` and the
FlexAttention backend. Without CUDA the kernel runs in Triton's interpreter (TRITON_INTERPRET=1, numpy)."""

from __future__ import annotations

import os

import pytest
import torch

from attnlab.errors import ConfigError, ShapeError

CUDA = torch.cuda.is_available()
if not CUDA:  # before triton loads: Triton's interpreter (numpy) runs the kernel on CPU tensors
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")
pytest.importorskip("torch.nn.attention.flex_attention")

from attnlab.blocksparse.sparse_entmax import (  # noqa: E402
    block_csr_from_graph,
    block_mask_from_graph,
    resolve_sparse_backend,
    sparse_entmax_attention,
)


@pytest.fixture(scope="module", autouse=True)
def interpret():
    """CPU: the kernel module runs in Triton's interpreter (conftest.triton_interpreter)."""
    from conftest import triton_interpreter

    yield from triton_interpreter("attnlab.blocksparse.kernels.entmax_triton")


def _qkv(H, Hkv, N, d, seed, spread=2.0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, H, N, d, generator=g, dtype=torch.float64) * spread
    k = torch.randn(1, Hkv, N, d, generator=g, dtype=torch.float64) * spread
    v = torch.randn(1, Hkv, N, d, generator=g, dtype=torch.float64)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def _reference(q, k, v, alpha, causal, pairs=None):
    """float64 entmax_bisect on explicitly masked scores (``pairs``: (H, N, N) bool allowed pairs, or all)."""
    from entmax import entmax_bisect

    q, k, v = q.double(), k.double(), v.double()
    G = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
    s = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    N = s.shape[-1]
    allowed = torch.ones(N, N, dtype=torch.bool)
    if causal:
        allowed = allowed.tril()
    if pairs is not None:
        allowed = allowed & pairs
    s = s.masked_fill(~allowed, float("-inf"))
    p = entmax_bisect(s, alpha=alpha, dim=-1, n_iter=300)
    p = torch.nan_to_num(p, nan=0.0)  # rows without an allowed key
    return p @ v


def _pairs(bg, blk, N):
    """(1, H, nb, nb) block graph -> (H, N, N) token pairs."""
    return bg[0].repeat_interleave(blk, -2).repeat_interleave(blk, -1)[:, :N, :N]


@pytest.mark.parametrize("N,blk,H,Hkv,alpha,seed", [(70, 32, 4, 2, 1.5, 1), (45, 16, 2, 1, 1.25, 2),
                                                      (64, 16, 3, 3, 2.0, 3)])
def test_triton_causal_gqa_matches_float64(N, blk, H, Hkv, alpha, seed):
    dev = "cuda" if CUDA else "cpu"
    q, k, v = (x.to(dev) for x in _qkv(H, Hkv, N, 16, seed))
    ref = _reference(q.cpu(), k.cpu(), v.cpu(), alpha, causal=True)
    nb = -(-N // blk)
    full = torch.ones(1, H, nb, nb, dtype=torch.bool, device=dev)
    res = sparse_entmax_attention(q, k, v, block_mask_from_graph(full, blk, N, causal=True), alpha=alpha,
                                  tol=1e-12, n_iter=40, return_info=True, backend="triton")
    assert torch.allclose(res.out.cpu(), ref, atol=1e-9, rtol=0)
    assert res.residual <= 1e-12 and res.passes == res.steps + 2 and res.steps <= 12


@pytest.mark.parametrize("causal", [True, False])
def test_triton_sparse_graph_one_tile_rows_tail_and_empty_rows(causal):
    """A random block graph (N = 100, not a multiple of the block) where some query blocks keep a single tile
    (causal: only the diagonal) and, non-causal, one query block keeps nothing (zero output); float32 inputs
    against float64 entmax restricted to the kept pairs, and the flex backend on the same mask."""
    N, blk, H = 100, 32, 2
    q, k, v = _qkv(H, 1, N, 16, 7 + causal, spread=1.5, dtype=torch.float32)
    nb = -(-N // blk)
    g = torch.Generator().manual_seed(11)
    bg = torch.rand(1, H, nb, nb, generator=g) < 0.5
    bg[0, 0, 1] = False
    bg[0, 0, 1, 3] = True  # one tile only (the tail block, 4 real columns)
    bg[0, 1, 2] = False  # causal: query block 2 keeps only its diagonal tile; non-causal: an empty query block
    bm = block_mask_from_graph(bg, blk, N, causal=causal)
    eff = bg | torch.eye(nb, dtype=torch.bool) if causal else bg
    ref = _reference(q, k, v, 1.5, causal, _pairs(eff, blk, N))
    res = sparse_entmax_attention(q, k, v, bm, alpha=1.5, tol=1e-6, n_iter=30, return_info=True, backend="triton")
    assert res.out.dtype == torch.float32
    err = (res.out.double() - ref).abs().max()
    assert err < 1e-5, err
    if not causal:
        assert torch.equal(res.out[0, 1, 64:96], torch.zeros(32, 16))
        assert torch.isinf(res.tau[0, 1, 64:96]).all()
    flex = sparse_entmax_attention(q, k, v, bm, alpha=1.5, tol=1e-6, n_iter=30, backend="flex")[0]
    assert (res.out - flex).abs().max() < 1e-5


@pytest.mark.parametrize("causal", [True, False])
def test_block_csr_matches_blockmask_on_both_backends(causal):
    """The cheap BlockCSR form gives the triton kernel the same tiles as the FlexAttention BlockMask, and the flex
    backend accepts it too (converted); float64 against entmax restricted to the graph."""
    N, blk, H = 80, 16, 2
    q, k, v = _qkv(H, 2, N, 16, 21 + causal, spread=1.5)
    nb = -(-N // blk)
    bg = torch.rand(1, H, nb, nb, generator=torch.Generator().manual_seed(5)) < 0.4
    csr = block_csr_from_graph(bg, blk, N, causal=causal)
    eff = bg | torch.eye(nb, dtype=torch.bool) if causal else bg
    assert torch.equal(csr.kv_num, (eff.tril() if causal else eff).sum(-1).int())
    ref = _reference(q, k, v, 1.5, causal, _pairs(eff, blk, N))
    a = sparse_entmax_attention(q, k, v, csr, tol=1e-12, n_iter=40, backend="triton")[0]
    b = sparse_entmax_attention(q, k, v, block_mask_from_graph(bg, blk, N, causal=causal), tol=1e-12, n_iter=40,
                                backend="triton")[0]
    c = sparse_entmax_attention(q, k, v, csr, tol=1e-12, n_iter=40, backend="flex")[0]
    for out in (a, b, c):
        assert torch.allclose(out, ref, atol=1e-9, rtol=0)
    with pytest.raises(ShapeError, match="nq == nk"):
        block_csr_from_graph(torch.ones(1, 1, 2, 3, dtype=torch.bool), 16, causal=True)


def test_triton_default_tolerance_few_passes_and_float64_tau_agrees_with_flex():
    q, k, v = _qkv(2, 2, 96, 32, 4, spread=1.5)
    nb = 3
    bm = block_mask_from_graph(torch.ones(1, 2, nb, nb, dtype=torch.bool), 32, causal=True)
    ref = _reference(q, k, v, 1.5, causal=True)
    res = sparse_entmax_attention(q, k, v, bm, alpha=1.5, return_info=True, backend="triton")
    assert res.residual <= 1e-3 and res.passes <= 6  # alpha 1.5: exact steps on the support, ~4 passes
    assert float((res.out - ref).norm() / ref.norm()) < 2e-3
    tight = sparse_entmax_attention(q, k, v, bm, alpha=1.5, tol=1e-12, n_iter=40, backend="triton")[1]
    flex = sparse_entmax_attention(q, k, v, bm, alpha=1.5, tol=1e-12, n_iter=40, backend="flex")[1]
    assert torch.allclose(tight.double(), flex, atol=1e-6)  # tau is stored in float32


def test_triton_bad_input_names_the_argument():
    q, k, v = _qkv(2, 2, 48, 16, 6)
    bm = block_mask_from_graph(torch.ones(1, 2, 2, 2, dtype=torch.bool), 24, causal=True)
    with pytest.raises(ConfigError, match="triton"):
        sparse_entmax_attention(q, k, v, bm, backend="triton")  # block 24: not a multiple of 16
    with pytest.raises(ConfigError, match="backend"):
        sparse_entmax_attention(q, k, v, bm, backend="nope")
    assert resolve_sparse_backend(q, bm) == "flex"  # CPU tensors: auto keeps the reference path


@pytest.mark.gpu
def test_gpu_triton_bf16_causal_gqa_matches_float64():
    if not CUDA:
        pytest.skip("needs CUDA")
    torch.manual_seed(0)
    B, H, Hkv, N, d, blk = 1, 4, 2, 1000, 64, 128
    q, k, v = (torch.randn(B, h, N, d, device="cuda", dtype=torch.bfloat16) for h in (H, Hkv, Hkv))
    nb = -(-N // blk)
    g = torch.rand(B, H, nb, nb, device="cuda") < 0.4
    for causal in (True, False):
        bm = block_mask_from_graph(g, blk, N, causal=causal)
        assert resolve_sparse_backend(q, bm) == "triton"
        res = sparse_entmax_attention(q, k, v, bm, alpha=1.5, return_info=True)
        eff = (g | torch.eye(nb, dtype=torch.bool, device="cuda")) if causal else g
        ref = _reference(q.cpu(), k.cpu(), v.cpu(), 1.5, causal, _pairs(eff.cpu(), blk, N))
        err = float((res.out.double().cpu() - ref).norm() / ref.norm())
        assert err < 1e-2, (causal, err)  # bf16 operands: 1e-3 .. 1e-2
        assert res.passes <= 10, res.passes
        print(f"gpu triton causal={causal}: rel err {err:.2e} vs float64, {res.passes} passes")
