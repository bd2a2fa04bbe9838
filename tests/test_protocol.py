"""Extension points of issue 12: a predictor registered from outside the package runs through the Pareto
evaluation and sparse_attention; every source gives the same AttentionCall seam."""

from __future__ import annotations

import pytest
import torch

from attnlab.attention import AttentionCall, AttentionSource
from attnlab.errors import ConfigError
from attnlab.sparsity.predictors import PREDICTORS, BasePredictor


class StridePredictor(BasePredictor):
    """Toy: key j is kept for query i iff j % stride == 0 or j == i (knob: stride)."""

    name = "toy-stride"
    knob = "stride"

    def __init__(self, stride: int = 2, seed: int = 0):
        super().__init__()
        self.stride, self.seed = stride, seed

    def _predict(self, q, k, valid):
        n, m = q.shape[2], k.shape[2]
        j = torch.arange(m, device=q.device)
        g = (j[None, :] % self.stride == 0) | (j[None, :] == torch.arange(n, device=q.device)[:, None])
        return g.expand(q.shape[0], q.shape[1], n, m).clone()

    def grid(self, n: int) -> list:
        return [1, 2, 4, 8]


@pytest.fixture
def toy():
    PREDICTORS.add("toy-stride", StridePredictor, "test predictor")
    yield "toy-stride"
    PREDICTORS.remove("toy-stride")


def _layers(n_layers: int = 2, B: int = 3, H: int = 2, N: int = 32, d: int = 8):
    from attnlab.sparsity.evaluate import LayerData
    from attnlab.sparsity.graphs import gold_graph

    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n_layers):
        q, k = torch.randn(B, H, N, d, generator=g), torch.randn(B, H, N, d, generator=g)
        out.append(LayerData(q, k, None, gold_graph(q, k, None, 1.5), 1.5, d ** -0.5))
    return out


def test_registered_toy_predictor_runs_in_pareto_evaluation(toy):
    from attnlab.sparsity.evaluate import fit_layers, sweep_method

    data = _layers()
    fitted = fit_layers(toy, data, seed=3)
    assert all(isinstance(p, StridePredictor) and p.seed in (3, 4) for p in fitted)  # seed + layer reached it
    res = sweep_method(toy, fitted, data)
    assert [p["knob"] for p in res["points"]] == [1, 2, 4, 8]
    first, last = res["points"][0]["mean"], res["points"][-1]["mean"]
    assert first["recall"] == pytest.approx(1.0) and first["sparsity"] == pytest.approx(0.0)
    assert last["sparsity"] > 0.5 and last["recall"] < 1.0


def test_registered_toy_predictor_runs_in_sparse_attention(toy):
    from attnlab.sparsity import sparse_attention
    from attnlab.blocksparse.flex import masked_attention_reference
    from attnlab.sparsity.predictors import make_predictor

    pred = make_predictor(toy, stride=4)
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 64, 8, generator=g, dtype=torch.float64) for _ in range(3))
    out, pattern, stats = sparse_attention(q, k, v, predictor=pred, block_size=16, return_pattern=True)
    # the token graph becomes tiles: a tile is kept iff it holds a predicted pair
    tiles = pred.predict(q, k).view(1, 2, 4, 16, 4, 16).any(-1).any(-2)
    mask = tiles.repeat_interleave(16, -2).repeat_interleave(16, -1)
    torch.testing.assert_close(out, masked_attention_reference(q, k, v, mask), rtol=0, atol=1e-12)
    assert stats["density"] == pytest.approx(float(tiles.float().mean()))


def test_unknown_predictor_names_the_flag_and_choices():
    from attnlab.sparsity.predictors import make_predictor

    with pytest.raises(ConfigError, match="--methods.*distance-thr"):
        make_predictor("no-such-method")


def test_sources_share_one_seam(minilm):
    """HF and our small transformer both hand AttentionCalls to a handler, and both satisfy the protocol."""
    from attnlab.models.transformer import SmallTransformer, TransformerConfig
    from attnlab.sources import as_source

    small = as_source(SmallTransformer(TransformerConfig(vocab_size=30, d_model=16, n_heads=2, max_len=8)).eval())
    for src, ids in ((small, torch.randint(0, 30, (2, 8))), (minilm, torch.randint(1000, 2000, (2, 8)))):
        assert isinstance(src, AttentionSource)
        seen: list[AttentionCall] = []
        with src.hooks(lambda call: seen.append(call), layers=[1]):
            src.forward(ids)
        assert [c.layer for c in seen] == [1] and seen[0].query.shape[:2] == (2, src.n_heads)
        assert src.describe()["name"] == src.name
