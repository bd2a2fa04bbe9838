"""Contracts of the public block-sparse tensor functions (issue 26): kept tiles, mask meaning, NaN isolation, and
bad arguments that raise ShapeError/ConfigError naming the argument instead of NaN, garbage or raw torch errors."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attnlab.blocksparse.predictors.cluster import ClusterBlockPredictor
from attnlab.blocksparse.predictors.pooled import PooledBudgetPredictor as PooledBlockPredictor
from attnlab.blocksparse.flex import mass_recall, masked_attention_reference, sparse_attention
from attnlab.blocksparse.sparse_entmax import (
    block_mask_from_graph,
    dense_entmax_attention,
    sparse_entmax_attention,
)
from attnlab.errors import ConfigError, ShapeError


def _qkv(n=256, h=2, d=8, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, h, n, d, generator=g, dtype=dtype) for _ in range(3)]


@pytest.mark.parametrize("n", [256, 512, 1024])
def test_default_budget_keeps_diagonal_and_sink_tiles(n):
    q, k, v = _qkv(n)
    _, pat, _ = sparse_attention(q, k, v, return_pattern=True)
    g = pat.block_graph()
    assert g.diagonal(dim1=-2, dim2=-1).all(), "a query block lost its own tile"
    assert g[..., 0].all(), "a query block lost the sink tile"


def test_budget_still_caps_large_n_rows():
    q, k, v = _qkv(128 * 40, h=1, d=4)
    _, pat, _ = sparse_attention(q, k, v, budget=0.1, return_pattern=True)
    counts = pat.block_graph().sum(-1)
    assert counts.max() <= 4 and counts.min() >= 2  # ceil(0.1 * 40) = 4 tiles, diagonal + sink always


def test_float_additive_mask_means_keep_where_zero():
    q, k, v = _qkv(256)
    m = torch.zeros(256, 256)
    m[:, 128:] = float("-inf")
    out = sparse_attention(q, k, v, predictor=m.expand(1, 2, -1, -1), block_size=128, backend="dense")
    ref = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=m.double())
    assert torch.allclose(out.double(), ref, atol=1e-5)


def test_float_mask_with_a_bias_is_refused():
    q, k, v = _qkv(256)
    with pytest.raises(ConfigError, match="additive"):
        sparse_attention(q, k, v, predictor=torch.full((1, 2, 256, 256), 0.5), block_size=128)


def test_nan_in_masked_out_keys_does_not_leak():
    q, k, v = _qkv(256)
    k[:, :, 200] = float("nan")
    v[:, :, 200] = float("nan")
    mask = torch.ones(1, 2, 256, 256, dtype=torch.bool)
    mask[..., 128:] = False
    out = sparse_attention(q, k, v, predictor=mask, block_size=128, backend="dense")
    assert torch.isfinite(out).all()
    # a row that does see the NaN key still gets NaN (not hidden)
    mask[:, :, :128, 128:] = True
    out = masked_attention_reference(q, k, v, mask)
    assert torch.isnan(out[:, :, :128]).all() and torch.isfinite(out[:, :, 128:]).all()


BAD_CALLS = {
    "scale nan": (lambda q, k, v: sparse_attention(q, k, v, scale=float("nan")), ConfigError, "scale"),
    "scale inf": (lambda q, k, v: sparse_attention(q, k, v, scale=float("inf")), ConfigError, "scale"),
    "block 0": (lambda q, k, v: sparse_attention(q, k, v, block_size=0), ConfigError, "block_size"),
    "block 96": (lambda q, k, v: sparse_attention(q, k, v, block_size=96), ShapeError, "block_size"),
    "int q": (lambda q, k, v: sparse_attention(q.long(), k.long(), v.long()), ShapeError, "dtype"),
    "mixed dtype": (lambda q, k, v: sparse_attention(q, k.double(), v), ShapeError, "dtype"),
    "3-d q": (lambda q, k, v: sparse_attention(q[0], k, v), ShapeError, "q must be"),
    "v length": (lambda q, k, v: sparse_attention(q, k, v[:, :, :128]), ShapeError, "v must be"),
    "mask heads": (lambda q, k, v: sparse_attention(q, k, v, predictor=torch.ones(1, 3, 2, 2, dtype=torch.bool)),
                   ShapeError, "heads"),
    "alpha inf": (lambda q, k, v: dense_entmax_attention(q, k, v, alpha=float("inf")), ConfigError, "alpha"),
    "alpha 1": (lambda q, k, v: dense_entmax_attention(q, k, v, alpha=1.0), ConfigError, "alpha"),
    "alpha 0.5": (lambda q, k, v: dense_entmax_attention(q, k, v, alpha=0.5), ConfigError, "alpha"),
    "chunk 0": (lambda q, k, v: dense_entmax_attention(q, k, v, chunk=0), ConfigError, "chunk"),
    "chunk -4": (lambda q, k, v: dense_entmax_attention(q, k, v, chunk=-4), ConfigError, "chunk"),
    "entmax int": (lambda q, k, v: dense_entmax_attention(q.int(), k.int(), v.int()), ShapeError, "dtype"),
    "n_iter 0": (lambda q, k, v: sparse_entmax_attention(
        q, k, v, block_mask_from_graph(torch.ones(1, 2, 2, 2, dtype=torch.bool), 128), n_iter=0), ConfigError, "n_iter"),
    "mask more heads": (lambda q, k, v: sparse_entmax_attention(
        q, k, v, block_mask_from_graph(torch.ones(1, 4, 2, 2, dtype=torch.bool), 128)), ShapeError, "heads"),
    "not a mask": (lambda q, k, v: sparse_entmax_attention(q, k, v, "dense"), ShapeError, "BlockMask"),
    "graph block 0": (lambda q, k, v: block_mask_from_graph(torch.ones(1, 2, 2, 2, dtype=torch.bool), 0),
                      ConfigError, "block"),
    "graph block -1": (lambda q, k, v: block_mask_from_graph(torch.ones(1, 2, 2, 2, dtype=torch.bool), -1),
                       ConfigError, "block"),
    "graph 3-d": (lambda q, k, v: block_mask_from_graph(torch.ones(2, 2, 2, dtype=torch.bool), 128), ShapeError, "4-d"),
    "rank 0": (lambda q, k, v: PooledBlockPredictor(proj="random", rank=0), ConfigError, "rank"),
    "pool 0": (lambda q, k, v: PooledBlockPredictor(pool=0), ConfigError, "pool"),
    "budget -1": (lambda q, k, v: PooledBlockPredictor(budget=-1), ConfigError, "budget"),
    "clusters 0": (lambda q, k, v: ClusterBlockPredictor(n_clusters=0), ConfigError, "n_clusters"),
    "predict block 0": (lambda q, k, v: PooledBlockPredictor().predict_blocks(q, k, 0), ConfigError, "block_size"),
    "predict scale nan": (lambda q, k, v: PooledBlockPredictor().predict_blocks(q, k, 128, scale=float("nan")),
                          ConfigError, "scale"),
}


@pytest.mark.parametrize("case", sorted(BAD_CALLS))
def test_bad_arguments_name_the_argument(case):
    call, err, word = BAD_CALLS[case]
    q, k, v = _qkv(256)
    with pytest.raises(err, match=word):
        call(q, k, v)


@pytest.mark.parametrize("kw,word", [({"rows": 0}, "rows"), ({"rows": -3}, "rows"), ({"topk": 0}, "topk"),
                                     ({"scale": float("nan")}, "scale")])
def test_mass_recall_refuses_meaningless_arguments(kw, word):
    q, k, v = _qkv(256)
    _, pat, _ = sparse_attention(q, k, v, return_pattern=True)
    with pytest.raises(ConfigError, match=word):
        mass_recall(q, k, pat, **kw)


_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.bool]
_SCALARS = [None, 0.5, 1.0, 0.0, -1.0, math.nan, math.inf, -math.inf]


@settings(max_examples=40, deadline=None, derandomize=True)
@given(dtype=st.sampled_from(_DTYPES), n_blocks=st.integers(1, 3), tail=st.sampled_from([0, 0, 5]),
       heads=st.integers(1, 2), d=st.sampled_from([4, 8]), block=st.sampled_from([16, 32, 0, -16]),
       scale=st.sampled_from(_SCALARS), causal=st.booleans())
def test_sparse_attention_contract_property(dtype, n_blocks, tail, heads, d, block, scale, causal):
    """Any call either raises an AttnlabError naming an argument, or returns a finite output of q's shape that
    equals the float64 masked reference of the pattern it reports."""
    n = max(block, 1) * n_blocks + tail
    g = torch.Generator().manual_seed(n * 7 + d)
    q, k, v = (torch.randn(1, heads, n, d, generator=g).to(dtype) for _ in range(3))
    legal = (dtype.is_floating_point and block > 0 and tail == 0
             and (scale is None or (math.isfinite(scale) and scale > 0)))
    if not legal:
        with pytest.raises((ShapeError, ConfigError), match="dtype|block_size|scale"):
            sparse_attention(q, k, v, block_size=block, scale=scale, causal=causal, backend="dense")
        return
    out, pat, _ = sparse_attention(q, k, v, block_size=block, scale=scale, causal=causal, backend="dense",
                                   return_pattern=True)
    assert out.shape == q.shape and out.dtype == q.dtype and torch.isfinite(out).all()
    ref = masked_attention_reference(q.double(), k.double(), v.double(), pat.token_mask(), scale)
    tol = 1e-4 if dtype in (torch.float32, torch.float64) else 5e-2
    assert (out.double() - ref).abs().max() <= tol
    g_blocks = pat.block_graph()
    assert g_blocks.diagonal(dim1=-2, dim2=-1).all() and g_blocks[..., 0].all()


@settings(max_examples=25, deadline=None, derandomize=True)
@given(alpha=st.sampled_from([1.5, 2.0, 1.0, 0.9, math.inf, math.nan]), n_iter=st.sampled_from([1, 20, 0, -2]),
       chunk=st.sampled_from([None, 8, 0, -1]), dtype=st.sampled_from([torch.float64, torch.float32, torch.int64]))
def test_dense_entmax_contract_property(alpha, n_iter, chunk, dtype):
    q, k, v = (x.to(dtype) for x in _qkv(16, h=1, d=4))
    legal = dtype.is_floating_point and alpha > 1 and math.isfinite(alpha) and n_iter >= 1 and (chunk is None or chunk >= 1)
    if not legal:
        with pytest.raises((ShapeError, ConfigError), match="dtype|alpha|n_iter|chunk"):
            dense_entmax_attention(q, k, v, alpha=alpha, n_iter=n_iter, chunk=chunk)
        return
    out = dense_entmax_attention(q, k, v, alpha=alpha, n_iter=n_iter, chunk=chunk)
    assert torch.isfinite(out).all() and out.shape == q.shape
