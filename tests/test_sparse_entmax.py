"""Sparse entmax attention (causal, GQA, Newton threshold) against float64 ``entmax_bisect``; dense backends."""

from __future__ import annotations

import warnings

import pytest
import torch

from attnlab.errors import ConfigError, ShapeError

pytest.importorskip("torch.nn.attention.flex_attention")

from attnlab.blocksparse import entmax_dense  # noqa: E402
from attnlab.blocksparse.sparse_entmax import block_mask_from_graph, sparse_entmax_attention  # noqa: E402


def _qkv(H, Hkv, N, d, seed, spread=2.0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, H, N, d, generator=g, dtype=torch.float64) * spread
    k = torch.randn(1, Hkv, N, d, generator=g, dtype=torch.float64) * spread
    v = torch.randn(1, Hkv, N, d, generator=g, dtype=torch.float64)
    return q, k, v


def _reference(q, k, v, alpha, causal):
    """float64 entmax_bisect on explicitly masked scores (independent of the backend code)."""
    from entmax import entmax_bisect

    G = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
    s = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    if causal:
        N = s.shape[-1]
        s = s.masked_fill(torch.ones(N, N, dtype=torch.bool).triu(1), float("-inf"))
    p = entmax_bisect(s, alpha=alpha, dim=-1, n_iter=300)
    return p @ v, p


@pytest.mark.parametrize("N,blk,H,Hkv,alpha,seed", [(70, 16, 4, 2, 1.5, 1), (45, 16, 2, 1, 1.25, 2),
                                                      (64, 16, 3, 3, 2.0, 3)])
def test_causal_gqa_matches_float64_entmax_bisect(N, blk, H, Hkv, alpha, seed):
    q, k, v = _qkv(H, Hkv, N, 8, seed)
    ref, p = _reference(q, k, v, alpha, causal=True)
    nb = -(-N // blk)
    full = torch.ones(1, H, nb, nb, dtype=torch.bool)
    res = sparse_entmax_attention(q, k, v, block_mask_from_graph(full, blk, N, causal=True), alpha=alpha,
                                  tol=1e-12, n_iter=40, return_info=True)
    assert torch.allclose(res.out, ref, atol=1e-9, rtol=0)
    assert res.residual <= 1e-12 and res.passes == 2 * res.steps + 2 and res.steps <= 12
    # gold support only (block level, lower triangle): same output; a graph missing gold blocks differs
    pad = torch.zeros(1, H, nb * blk, nb * blk, dtype=torch.bool)
    pad[..., :N, :N] = p > 0
    gold = pad.view(1, H, nb, blk, nb, blk).any(3).any(-1)
    out, _ = sparse_entmax_attention(q, k, v, block_mask_from_graph(gold, blk, N, causal=True), alpha=alpha,
                                     tol=1e-12, n_iter=40)
    assert torch.allclose(out, ref, atol=1e-9, rtol=0)
    mass = torch.zeros(1, H, nb * blk, nb * blk, dtype=torch.float64)
    mass[..., :N, :N] = p
    mass = mass.view(1, H, nb, blk, nb, blk).sum((3, 5)).tril(-1)  # off-diagonal block masses
    top = int(mass[0, 0].argmax())
    bad = gold.clone()
    bad[0, 0, top // nb, top % nb] = False  # drop the heaviest off-diagonal gold block of head 0
    out2, _ = sparse_entmax_attention(q, k, v, block_mask_from_graph(bad, blk, N, causal=True), alpha=alpha,
                                      tol=1e-12, n_iter=40)
    assert not torch.allclose(out2, ref, atol=1e-6)


def test_noncausal_tail_and_few_passes_at_default_tolerance():
    q, k, v = _qkv(2, 2, 100, 16, 4, spread=1.5)
    ref, _ = _reference(q, k, v, 1.5, causal=False)
    full = torch.ones(1, 2, 4, 4, dtype=torch.bool)
    res = sparse_entmax_attention(q, k, v, block_mask_from_graph(full, 32, 100), alpha=1.5, return_info=True)
    assert res.residual <= 1e-3 and res.passes <= 14  # default tol 1e-3: a few passes, not 31
    err = float((res.out - ref).norm() / ref.norm())
    assert err < 2e-3, err


def test_dense_backend_entmax_causal_gqa_and_fallback_warning(monkeypatch):
    q, k, v = _qkv(4, 2, 33, 8, 5)
    ref, _ = _reference(q, k, v, 1.5, causal=True)
    out = entmax_dense.dense_entmax_attention(q, k, v, 1.5, n_iter=200, causal=True, chunk=10, backend="entmax")
    assert torch.allclose(out, ref, atol=1e-10)
    monkeypatch.setattr(entmax_dense, "adasplash_available", lambda: False)
    monkeypatch.setattr(entmax_dense, "_WARNED", set())
    with pytest.warns(RuntimeWarning, match="adasplash"):
        assert entmax_dense.resolve_dense_backend(torch.device("cuda")) == "entmax"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert entmax_dense.resolve_dense_backend(torch.device("cpu")) == "entmax"
    with pytest.raises(ConfigError, match="adasplash"):
        entmax_dense.resolve_dense_backend(torch.device("cpu"), "adasplash")


def test_bad_input_names_the_argument():
    q, k, v = _qkv(3, 2, 32, 8, 6)
    bm = block_mask_from_graph(torch.ones(1, 3, 2, 2, dtype=torch.bool), 16, causal=True)
    with pytest.raises(ShapeError, match="kv heads"):
        sparse_entmax_attention(q, k, v, bm)
    q, k, v = _qkv(2, 2, 32, 8, 6)
    for alpha in (1.0, 2.5, float("nan")):
        with pytest.raises(ConfigError, match="alpha"):
            sparse_entmax_attention(q, k, v, bm, alpha=alpha)
    with pytest.raises(ConfigError, match="n_iter"):
        sparse_entmax_attention(q, k, v, bm, n_iter=0)
    with pytest.raises(ConfigError, match="tol"):
        sparse_entmax_attention(q, k, v, bm, tol=0.0)
    with pytest.raises(ShapeError, match="nq == nk"):
        block_mask_from_graph(torch.ones(1, 1, 2, 3, dtype=torch.bool), 16, causal=True)
    with pytest.raises(ConfigError, match="backend"):
        entmax_dense.dense_entmax_attention(q, k, v, backend="nope")


@pytest.mark.gpu
def test_gpu_causal_sparse_entmax_vs_adasplash2():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    pytest.importorskip("adasplash")
    torch.manual_seed(0)
    B, H, Hkv, N, d, blk = 1, 4, 2, 1024, 64, 128
    q, k, v = (torch.randn(B, h, N, d, device="cuda", dtype=torch.bfloat16) for h in (H, Hkv, Hkv))
    nb = N // blk
    bm = block_mask_from_graph(torch.ones(B, H, nb, nb, dtype=torch.bool, device="cuda"), blk, causal=True)
    res = sparse_entmax_attention(q, k, v, bm, alpha=1.5, return_info=True)
    ref, _ = _reference(q.double().cpu(), k.double().cpu(), v.double().cpu(), 1.5, causal=True)
    ours = float((res.out.double().cpu() - ref).norm() / ref.norm())
    ada = entmax_dense.dense_entmax_attention(q, k, v, 1.5, causal=True, backend="adasplash")
    theirs = float((ada.double().cpu() - ref).norm() / ref.norm())
    assert ours < 2e-2 and theirs < 2e-2, (ours, theirs)
    assert res.passes <= 16
