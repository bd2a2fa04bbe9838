"""The one block-predictor registry and factory, the 'full' reference predictor, the shared row sampler and
recall measure, and adding a block predictor as one file plus one registration."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from attnlab.blocksparse.blockmask import BlockPattern, block_graph_to_kv, kv_to_blockmask, token_to_block_graph
from attnlab.blocksparse.predictors import BLOCK_PREDICTORS, BlockPrediction, make_block_predictor
from attnlab.blocksparse.recall import head_recall, mass_recall, row_token_probs, sample_rows
from attnlab.errors import ConfigError


def _qk(seed=0, B=1, H=2, N=128, D=8):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H, N, D, generator=g) * 2, torch.randn(B, H, N, D, generator=g) * 2)


def test_factory_names_the_flag_and_rejects_unknown_options():
    with pytest.raises(ConfigError, match="--predictor: unknown block predictor 'nope'; choose from .*full"):
        make_block_predictor("nope", flag="--predictor")
    with pytest.raises(ConfigError, match="--block-predictor pooled: takes .*pool.*got \\['poool'\\]"):
        make_block_predictor("pooled", poool=3)
    with pytest.raises(ConfigError, match="full: takes no options"):
        make_block_predictor("full", flag="--predictor", pool=3)
    assert make_block_predictor("pooled", pool=16).pool == 16


@pytest.mark.parametrize("causal", [True, False])
def test_full_keeps_every_tile_at_no_cost(causal):
    q, k = _qk()
    res = make_block_predictor("full").predict(q, k, causal=causal, block_size=32)
    nb = 4
    want = torch.ones(nb, nb, dtype=torch.bool)
    want = want.tril() if causal else want
    assert res.cost == 0.0 and torch.equal(res.pattern.block_graph()[0, 0], want)
    assert head_recall(q, k, res.pattern, rows=32)["min"] == pytest.approx(1.0, abs=1e-6)


def test_a_new_block_predictor_is_one_class_plus_one_registration():
    """Registered once, it is reachable by name from the factory, prefill's --predictor and sparse_attention."""
    from attnlab.blocksparse.flex import sparse_attention
    from attnlab.blocksparse.prefill import predict_fn, predictor_names

    @BLOCK_PREDICTORS.register("toy-diagonal", help="diagonal tiles only")
    @dataclass
    class Diagonal:
        extra: int = 0

        def predict(self, q, k, causal=True, block_size=128, p=None, scale=None):
            B, H, N, _ = q.shape
            g = torch.eye(N // block_size, dtype=torch.bool).expand(B, H, -1, -1)
            return BlockPrediction(BlockPattern(block_graph_to_kv(g, causal), block_size, causal), 1.0)

        def predict_blocks(self, q, k, block_size=128, causal=False, scale=None):
            return self.predict(q, k, causal, block_size).pattern

    try:
        q, k = _qk()
        assert "toy-diagonal" in predictor_names()
        pat, cost = predict_fn(make_block_predictor("toy-diagonal", extra=1))(q, k, 0.9, 32, 8 ** -0.5)
        assert cost == 1.0 and int(pat.block_graph().sum()) == 2 * 4
        out, pat2, st = sparse_attention(q, k, k, make_block_predictor("toy-diagonal"), block_size=32,
                                         causal=True, return_pattern=True)
        assert st["density"] == pytest.approx(4 / 16) and out.shape == q.shape
    finally:
        BLOCK_PREDICTORS.remove("toy-diagonal")


def test_row_sampler_schemes():
    # uniform: the rule every uniform copy used (randperm of a seeded generator, first m, sorted)
    ref = torch.randperm(100, generator=torch.Generator().manual_seed(5))[:10].sort().values
    assert torch.equal(sample_rows(100, 10, 5), ref)
    assert torch.equal(sample_rows(7, 10, 5), torch.arange(7))
    even, odd = sample_rows(100, 20, 0, 0), sample_rows(100, 20, 0, 1)
    assert (even % 2 == 0).all() and (odd % 2 == 1).all() and len(even) == 20


def test_recall_measures_agree_with_float64_dense():
    q, k = _qk(1, N=128)
    pat = make_block_predictor("pooled").predict(q, k, causal=True, block_size=32, p=0.8).pattern
    rows = sample_rows(128, 128, 0)  # every row
    p = row_token_probs(q.double(), k.double(), rows, True)
    ref = (p * pat.token_mask()[:, :, rows].double()).sum(-1).mean()
    assert mass_recall(q, k, pat, rows=128)["mass"] == pytest.approx(float(ref), abs=1e-5)
    hr = head_recall(q, k, pat, rows=64, parity=1)
    assert hr["rows"] == 64 and 0.0 < hr["min"] <= hr["mean"] <= 1.0


def test_one_token_to_block_graph_with_padding():
    from attnlab.blocksparse.sparse_entmax import token_to_block_graph as entmax_t2b

    g = torch.zeros(1, 1, 10, 10, dtype=torch.bool)
    g[0, 0, 9, 1] = True
    want = torch.zeros(1, 1, 3, 3, dtype=torch.bool)
    want[0, 0, 2, 0] = True
    assert torch.equal(token_to_block_graph(g, 4, pad=True), want) and torch.equal(entmax_t2b(g, 4), want)
    with pytest.raises(Exception, match="multiple of block_size"):
        token_to_block_graph(g, 4)


def test_q_side_block_lists_only_when_asked():
    kv = block_graph_to_kv(torch.ones(1, 1, 2, 2, dtype=torch.bool).tril(), True)
    from attnlab.blocksparse.blockmask import _FROM_KV_PARAMS

    if "compute_q_blocks" in _FROM_KV_PARAMS:  # older torch always builds them
        assert kv_to_blockmask(kv, 16).q_indices is None
    assert kv_to_blockmask(kv, 16, compute_q_blocks=True).q_indices is not None


@pytest.mark.gpu
def test_run_pattern_backward_through_flex():
    """With inputs that require grad, run_pattern gives FlexAttention the q-side lists its backward reads."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from attnlab.blocksparse.flex import masked_attention_reference, run_pattern

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 256, 64, generator=g).cuda().requires_grad_() for _ in range(3))
    pat = make_block_predictor("full").predict(q.detach(), k.detach(), causal=True, block_size=128).pattern
    out = run_pattern(q, k, v, pat, "flex")
    out.sum().backward()
    ref_q = q.detach().double().requires_grad_()
    masked_attention_reference(ref_q, k.detach().double(), v.detach().double(), pat.token_mask()).sum().backward()
    torch.testing.assert_close(q.grad.double(), ref_q.grad, atol=2e-3, rtol=2e-3)
