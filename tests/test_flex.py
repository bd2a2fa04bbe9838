"""Block masks, block predictors and predicted-sparse attention (CPU; GPU tests skip without CUDA)."""

from __future__ import annotations

import pytest
import torch

from attnlab.errors import ConfigError, ShapeError
from attnlab.blocksparse.adapter import AssignBlockPredictor
from attnlab.blocksparse.predictors.cluster import ClusterBlockPredictor
from attnlab.blocksparse.predictors.pooled import PooledBudgetPredictor, budget_blocks, lowrank_projections
from attnlab.blocksparse.blockmask import (
    BlockPattern,
    block_graph_to_blockmask,
    block_graph_to_kv,
    blockmask_matches,
    cluster_pattern,
    cluster_permutation,
    kv_to_block_graph,
    kv_to_blockmask,
    pattern_from_block_graph,
    permute_tokens,
    token_to_block_graph,
    topk_to_kv,
    unpermute_tokens,
)
from attnlab.blocksparse.flex import (
    dense_attention_sdpa,
    masked_attention_reference,
    masked_rows_reference,
    mass_recall,
    relative_error,
    run_pattern,
    sparse_attention,
)

CPU = torch.device("cpu")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _qkv(seed: int, B: int = 1, H: int = 2, N: int = 128, D: int = 16, dtype=torch.float64, device=CPU):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, N, D, generator=g, dtype=torch.float64).to(device=device, dtype=dtype) for _ in range(3)]


def _naive(q, k, v, allowed):
    """Row-by-row float64 reference: softmax over allowed keys only; empty rows -> 0."""
    B, H, N, D = q.shape
    out = torch.zeros(B, H, N, v.shape[-1], dtype=torch.float64)
    scale = D ** -0.5
    for b in range(B):
        for h in range(H):
            for i in range(N):
                js = allowed[b, h, i].nonzero().flatten()
                if js.numel() == 0:
                    continue
                s = (k[b, h, js].double() @ q[b, h, i].double()) * scale
                out[b, h, i] = torch.softmax(s, 0) @ v[b, h, js].double()
    return out


def _random_graph(seed: int, B: int, H: int, nb: int, p: float = 0.4) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(B, H, nb, nb, generator=g) < p


# ---------------------------------------------------------------------------------------------------
# dense equivalence
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [False, True])
def test_full_mask_equals_dense(causal):
    q, k, v = _qkv(1)
    full = torch.ones(1, 2, 128 // 32, 128 // 32, dtype=torch.bool)
    out = sparse_attention(q, k, v, predictor=full, block_size=32, causal=causal)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
    assert relative_error(out, ref) < 1e-12
    assert relative_error(dense_attention_sdpa(q, k, v, causal=causal), ref) < 1e-12


@pytest.mark.parametrize("seed", [2, 3])
@pytest.mark.parametrize("causal", [False, True])
def test_masked_equals_naive_reference(seed, causal):
    B, H, N, bs = 2, 2, 64, 16
    q, k, v = _qkv(seed, B, H, N)
    g = _random_graph(seed, B, H, N // bs)
    out, pat, stats = sparse_attention(q, k, v, predictor=g, block_size=bs, causal=causal, return_pattern=True)
    allowed = g.repeat_interleave(bs, 2).repeat_interleave(bs, 3)
    if causal:
        allowed = allowed & torch.ones(N, N, dtype=torch.bool).tril()
    assert torch.equal(pat.token_mask(), allowed)
    assert relative_error(out, _naive(q, k, v, allowed)) < 1e-12
    assert stats["backend"] == "dense"
    rows = torch.tensor([0, 5, 17, 63])
    assert relative_error(masked_rows_reference(q, k, v, pat, rows), out[:, :, rows]) < 1e-12


def test_empty_rows_give_zero():
    q, k, v = _qkv(4, N=64)
    g = torch.zeros(1, 2, 4, 4, dtype=torch.bool)
    g[:, :, 1:, 0] = True
    out = sparse_attention(q, k, v, predictor=g, block_size=16)
    assert torch.all(out[:, :, :16] == 0) and torch.isfinite(out).all()


def test_token_graph_predictor_and_bucket_adapters():
    q, k, v = _qkv(5, N=64)
    tok = torch.rand(1, 2, 64, 64, generator=torch.Generator().manual_seed(5)) < 0.02
    pat = sparse_attention(q, k, v, predictor=tok, block_size=16, return_pattern=True)[1]
    assert torch.equal(pat.block_graph(), token_to_block_graph(tok, 16))

    class Issue4Like:  # token-level predict(q, k, valid) -> (B, H, N, N)
        def predict(self, q, k, valid):
            return tok

    pat2 = sparse_attention(q, k, v, predictor=Issue4Like(), block_size=16, return_pattern=True)[1]
    assert torch.equal(pat2.block_graph(), pat.block_graph())

    class Buckets:  # assign(q, k) -> (B, H, N, n_hash)
        def assign(self, q, k):
            ids = (torch.arange(q.shape[2]) % 4).expand(q.shape[0], q.shape[1], -1)
            return ids.unsqueeze(-1), ids.unsqueeze(-1)

    out, pat3, _ = sparse_attention(q, k, v, predictor=Buckets(), block_size=16, return_pattern=True)
    ids = torch.arange(64) % 4
    same = (ids.view(-1, 1) == ids.view(1, -1)).expand(1, 2, 64, 64)
    assert pat3.permuted and bool((pat3.token_mask() | ~same).all())  # covers every same-bucket pair
    assert relative_error(out, _naive(q, k, v, pat3.token_mask())) < 1e-12
    with pytest.raises(ConfigError):
        sparse_attention(q, k, v, predictor=object(), block_size=16)


# ---------------------------------------------------------------------------------------------------
# block masks
# ---------------------------------------------------------------------------------------------------


def test_token_to_block_graph_threshold():
    m = torch.zeros(1, 1, 8, 8, dtype=torch.bool)
    m[0, 0, 0, 0] = True  # 1/16 of block (0, 0)
    m[0, 0, 4:, 4:] = True  # all of block (1, 1)
    assert token_to_block_graph(m, 4).tolist() == [[[[True, False], [False, True]]]]
    assert token_to_block_graph(m, 4, min_density=0.5).tolist() == [[[[False, False], [False, True]]]]
    with pytest.raises(ShapeError):
        token_to_block_graph(torch.zeros(1, 1, 10, 10, dtype=torch.bool), 4)


@pytest.mark.parametrize("causal", [False, True])
def test_from_kv_blocks_to_dense_matches_graph(causal):
    g = _random_graph(6, 2, 3, 8)
    want = g & torch.ones(8, 8, dtype=torch.bool).tril() if causal else g
    bm = block_graph_to_blockmask(g, 32, causal=causal)
    assert blockmask_matches(bm, want)
    kv = block_graph_to_kv(g, causal)
    assert torch.equal(kv_to_block_graph(kv), want)
    if causal:  # only the diagonal is partial
        assert torch.equal(kv.kv_num_blocks, torch.diagonal(g, dim1=-2, dim2=-1).to(torch.int32))


@pytest.mark.parametrize("causal", [False, True])
def test_topk_to_kv(causal):
    g = torch.Generator().manual_seed(7)
    s = torch.randn(1, 2, 8, 8, generator=g)
    force = torch.zeros(8, 8, dtype=torch.bool)
    force[:, 0] = True
    kv = topk_to_kv(s, 3, causal=causal, force=force)
    got = kv_to_block_graph(kv)
    masked = s.masked_fill(force, float("inf"))
    if causal:
        masked = masked.masked_fill(torch.ones(8, 8, dtype=torch.bool).triu(1), float("-inf"))
        masked = masked.masked_fill(torch.eye(8, dtype=torch.bool), float("inf"))
    for i in range(8):
        n = min(3, i + 1) if causal else 3
        want = set(torch.topk(masked[0, 0, i], n).indices.tolist())
        assert set(got[0, 0, i].nonzero().flatten().tolist()) == want
    assert bool(got[..., 0].all())
    assert blockmask_matches(kv_to_blockmask(kv, 16), got)
    # per-row counts as a tensor
    kv2 = topk_to_kv(s, torch.tensor([1, 2, 3, 4, 5, 6, 7, 8]).expand(1, 2, 8), kmax=8)
    assert kv_to_block_graph(kv2).sum(-1).tolist()[0][0] == [1, 2, 3, 4, 5, 6, 7, 8]


def test_permutation_round_trip():
    g = torch.Generator().manual_seed(8)
    ids = torch.randint(0, 5, (2, 3, 64), generator=g)
    perm, inv = cluster_permutation(ids)
    x = torch.randn(2, 3, 64, 4, generator=g)
    xs = permute_tokens(x, perm)
    assert torch.equal(unpermute_tokens(xs, perm), x)
    assert torch.equal(torch.gather(xs, 2, inv.unsqueeze(-1).expand_as(x)), x)
    assert bool((torch.gather(ids, -1, perm).diff(dim=-1) >= 0).all())


@pytest.mark.parametrize("causal", [False, True])
def test_cluster_pattern_covers_same_cluster_pairs(causal):
    B, H, N, bs = 1, 2, 64, 8
    q, k, v = _qkv(9, B, H, N)
    gen = torch.Generator().manual_seed(9)
    qi = torch.randint(0, 6, (B, H, N), generator=gen)
    ki = torch.randint(0, 6, (B, H, N), generator=gen)
    pat = cluster_pattern(qi, ki, bs, causal)
    allowed = pat.token_mask()
    same = qi.unsqueeze(-1) == ki.unsqueeze(-2)
    if causal:
        same = same & torch.ones(N, N, dtype=torch.bool).tril()
    assert bool((allowed | ~same).all())
    out = run_pattern(q, k, v, pat)
    assert relative_error(out, _naive(q, k, v, allowed)) < 1e-12
    assert blockmask_matches(pat.block_mask(), pat.block_graph())


# ---------------------------------------------------------------------------------------------------
# block predictors
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "pred",
    [
        PooledBudgetPredictor(budget=1.0, pool=8),
        PooledBudgetPredictor(budget=1.0, mass=1.0, proj="random", rank=4, pool=4, reduce="lse"),
        PooledBudgetPredictor(budget=1.0, proj="lowrank", rank=4, reduce="mean"),
        ClusterBlockPredictor(n_clusters=1),
    ],
)
@pytest.mark.parametrize("causal", [False, True])
def test_full_budget_full_recall(pred, causal):
    q, k, v = _qkv(10, N=128, dtype=torch.float32)
    out, pat, _ = sparse_attention(q, k, v, predictor=pred, block_size=32, causal=causal, return_pattern=True)
    r = mass_recall(q, k, pat, rows=64)
    assert r["mass"] > 1 - 1e-5 and r["topk"] == 1.0
    ref = dense_attention_sdpa(q, k, v, causal=causal)
    assert relative_error(out, ref) < 1e-5


def test_budget_and_forced_blocks():
    q, k, _ = _qkv(11, N=256, dtype=torch.float32)
    pred = PooledBudgetPredictor(budget=0.25, pool=16, sink_blocks=1)
    g = pred.predict_blocks(q, k, 32).block_graph()  # nb = 8, budget 2 per row
    assert bool((g.sum(-1) == 2).all())
    assert bool(g[..., 0].all()) and bool(torch.diagonal(g, dim1=-2, dim2=-1).all())
    assert budget_blocks(0.1, 256) == 26 and budget_blocks(3, 8) == 3
    with pytest.raises(ConfigError):
        budget_blocks(1.5, 8)
    with pytest.raises(ConfigError):
        PooledBudgetPredictor(proj="pca")


def test_pooled_predictor_finds_planted_blocks():
    """Keys of block j aligned with queries of block pi(j): the predictor must find the permutation."""
    gen = torch.Generator().manual_seed(12)
    nb, bs, D = 8, 16, 32
    dirs = torch.nn.functional.normalize(torch.randn(nb, D, generator=gen), dim=-1) * 10
    pi = torch.randperm(nb, generator=gen)
    q = (dirs.repeat_interleave(bs, 0) + 0.1 * torch.randn(nb * bs, D, generator=gen)).view(1, 1, -1, D)
    k = (dirs[pi].repeat_interleave(bs, 0) + 0.1 * torch.randn(nb * bs, D, generator=gen)).view(1, 1, -1, D)
    pred = PooledBudgetPredictor(budget=1, pool=8, sink_blocks=0, local_blocks=-1, seed=0)
    g = pred.predict_blocks(q, k, bs).block_graph()[0, 0]
    for j in range(nb):
        assert bool(g[pi[j], j])
    r = mass_recall(q, k, pred.predict_blocks(q, k, bs), rows=64)
    assert r["mass"] > 0.99


def test_lowrank_full_rank_reproduces_logits():
    q, k, _ = _qkv(13, N=128, D=16)
    pq, pk = lowrank_projections(q, k, rank=16, rows=128)
    s = q @ k.transpose(-1, -2)
    s2 = (q @ pq.double()) @ (k @ pk.double()).transpose(-1, -2)
    assert relative_error(s2, s) < 1e-6


def test_predictors_are_seeded():
    q, k, _ = _qkv(14, N=128, dtype=torch.float32)
    for make in (lambda: ClusterBlockPredictor(n_clusters=4, seed=3),
                 lambda: ClusterBlockPredictor(n_clusters=4, method="lsh", seed=3),
                 lambda: PooledBudgetPredictor(budget=0.5, proj="random", rank=4, seed=3)):
        a, b = make().predict_blocks(q, k, 16), make().predict_blocks(q, k, 16)
        assert torch.equal(a.block_graph(), b.block_graph())
    ad = AssignBlockPredictor(ClusterBlockPredictor(n_clusters=4, seed=3))
    assert ad.predict_blocks(q, k, 16).permuted


def test_shape_errors():
    q, k, v = _qkv(15, N=100)
    with pytest.raises(ShapeError):
        sparse_attention(q, k, v, block_size=32)


def test_pattern_density():
    g = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    g[..., 0] = True
    assert pattern_from_block_graph(g, 16).density() == pytest.approx(0.25)
    assert isinstance(pattern_from_block_graph(g, 16), BlockPattern)


# ---------------------------------------------------------------------------------------------------
# GPU: the compiled FlexAttention kernel against the dense path (skipped without CUDA)
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(params=[pytest.param("cuda", marks=[pytest.mark.gpu, needs_cuda])])
def gpu_device(request):
    return torch.device(request.param)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kind", ["pooled", "cluster"])
def test_flex_matches_dense_path(gpu_device, causal, kind):
    q, k, v = _qkv(16, B=1, H=4, N=1024, D=64, dtype=torch.bfloat16, device=gpu_device)
    pred = (PooledBudgetPredictor(budget=0.25) if kind == "pooled"
            else ClusterBlockPredictor(n_clusters=8, inner=PooledBudgetPredictor(budget=0.1)))
    pat = pred.predict_blocks(q, k, 128, causal)
    out = run_pattern(q, k, v, pat, backend="flex")
    ref = run_pattern(q.double(), k.double(), v.double(), pat, backend="dense")
    assert torch.isfinite(out).all()
    assert relative_error(out, ref) < 2e-2
    full = run_pattern(q, k, v, pattern_from_block_graph(
        torch.ones(1, 4, 8, 8, dtype=torch.bool, device=gpu_device), 128, causal), backend="flex")
    assert relative_error(full, masked_attention_reference(q.double(), k.double(), v.double(), None if not causal
                          else torch.ones(1024, 1024, dtype=torch.bool, device=gpu_device).tril())) < 2e-2
