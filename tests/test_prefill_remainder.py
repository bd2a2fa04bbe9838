"""The prefill remainder hook (issue 28): --remainder validation and the call into
attnlab.blocksparse.remainder.add_remainder with the executed tile mask and the kernel's log-sum-exp (CPU)."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from attnlab.blocksparse.predictors import make_block_predictor
from attnlab.blocksparse.prefill import PrefillConfig, PrefillHandler, predict_fn
from attnlab.blocksparse.prefill.config import remainder_names
from attnlab.blocksparse.prefill.handler import sparse_with_lse
from attnlab.errors import ConfigError


class _Call:
    def __init__(self, q, k, v):
        self.layer, self.query, self.key, self.value = 0, q, k, v
        self.valid = self.bias = self.softcap = None
        self.scaling = q.shape[-1] ** -0.5


def _qkv(n=64, seed=3):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(1, 2, n, 8, generator=g, dtype=torch.float64) * s for s in (2.0, 2.0, 1.0))


@pytest.fixture
def fake_remainder(monkeypatch):
    """A stand-in remainder module (the real one lives in another branch): records its arguments."""
    mod = types.ModuleType("attnlab.blocksparse.remainder")
    mod.REMAINDERS = {"none": None, "probe": None}
    mod.calls = []

    def add_remainder(q, k, v, keep, block, out, lse, method, scale=None):
        mod.calls.append(dict(keep=keep, block=block, out=out.clone(), lse=lse, method=method, scale=scale))
        return out + 1.0

    mod.add_remainder = add_remainder
    monkeypatch.setitem(sys.modules, "attnlab.blocksparse.remainder", mod)
    return mod


def test_remainder_validated():
    with pytest.raises(ConfigError, match="--remainder"):
        PrefillConfig(model="m", remainder="probe")
    assert PrefillConfig(model="m").remainder == "none"
    assert {"none", "pooled", "hybrid8"} <= set(remainder_names())  # the real registry


def test_real_remainder_moves_sparse_output_towards_dense():
    """The handler with the real ``pooled`` remainder: its output is closer to dense attention than sparse-only
    (structured keys: the dropped tiles are nearly constant, where the pooled estimate is good)."""
    g = torch.Generator().manual_seed(5)
    n, d = 64, 8
    centres = torch.randn(1, 2, n // 16, 1, d, generator=g, dtype=torch.float64)
    k = (centres + 0.05 * torch.randn(1, 2, n // 16, 16, d, generator=g, dtype=torch.float64)).reshape(1, 2, n, d)
    q = torch.randn(1, 2, n, d, generator=g, dtype=torch.float64)
    v = torch.randn(1, 2, n, d, generator=g, dtype=torch.float64)
    predict = predict_fn(make_block_predictor("oracle"))
    sparse = PrefillHandler("sparse", predict, recall=0.6, block_size=16)(_Call(q, k, v))
    fixed = PrefillHandler("sparse", predict, recall=0.6, block_size=16, remainder="pooled")(_Call(q, k, v))
    s = (q @ k.transpose(-1, -2)) * d ** -0.5
    s = s.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    dense = torch.softmax(s, -1) @ v
    err = lambda o: float((o - dense).norm() / dense.norm())  # noqa: E731
    assert err(sparse) > 1e-3  # tiles were dropped
    assert err(fixed) < 0.5 * err(sparse)


def test_remainder_names_from_module(fake_remainder):
    assert remainder_names() == ("none", "probe")
    assert PrefillConfig(model="m", remainder="probe").remainder == "probe"
    with pytest.raises(ConfigError, match="--remainder"):
        PrefillConfig(model="m", remainder="nope")


def test_sparse_with_lse_equals_float64_reference():
    q, k, v = _qkv()
    pattern, _ = predict_fn(make_block_predictor("oracle"))(q, k, 0.6, 16, 8 ** -0.5)
    out, lse = sparse_with_lse(q, k, v, pattern, 8 ** -0.5)
    s = (q @ k.transpose(-1, -2)) * 8 ** -0.5
    s = s.masked_fill(~pattern.token_mask(), float("-inf"))
    torch.testing.assert_close(lse, torch.logsumexp(s, -1), atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(out, torch.softmax(s, -1) @ v, atol=1e-12, rtol=1e-12)
    assert float(pattern.density()) < 0.9  # a real sparse pattern, so the mask matters


def test_handler_calls_add_remainder_with_executed_tiles(fake_remainder):
    q, k, v = _qkv()
    predict = predict_fn(make_block_predictor("oracle"))
    plain = PrefillHandler("sparse", predict, recall=0.6, block_size=16)(_Call(q, k, v))
    out = PrefillHandler("sparse", predict, recall=0.6, block_size=16, remainder="probe")(_Call(q, k, v))
    (c,) = fake_remainder.calls
    pattern, _ = predict(q, k, 0.6, 16, 8 ** -0.5)
    assert c["method"] == "probe" and c["block"] == 16 and c["scale"] == pytest.approx(8 ** -0.5)
    assert c["keep"].dtype == torch.bool and c["keep"].shape == (1, 2, 4, 4)
    assert torch.equal(c["keep"], pattern.block_graph())
    torch.testing.assert_close(c["out"], plain, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(out, plain + 1.0, atol=1e-12, rtol=1e-12)


def test_no_remainder_never_imports_module(fake_remainder):
    q, k, v = _qkv()
    PrefillHandler("sparse", predict_fn(make_block_predictor("oracle")), recall=0.6, block_size=16)(_Call(q, k, v))
    assert fake_remainder.calls == []
