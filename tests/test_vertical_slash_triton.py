"""The fused Triton statistics of the vertical-slash fast path (``kernels/vertical_slash_triton.py``) against the
eager torch path and a float64 loop. Without CUDA the kernels run in Triton's interpreter (TRITON_INTERPRET=1)."""

from __future__ import annotations

import os

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:  # before triton loads: the interpreter runs the kernels on CPU tensors
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from attnlab.blocksparse.blockmask import kv_to_block_graph  # noqa: E402
from attnlab.blocksparse.kernels.vertical_slash import VSParams, plan_for, vertical_slash_fast  # noqa: E402
from attnlab.blocksparse.predictors.core import sample_rows  # noqa: E402
from attnlab.errors import ConfigError  # noqa: E402

SMALL = dict(last_q=16, vertical_size=40, slash_size=60, sink_tokens=4, local_offsets=8)


@pytest.fixture(scope="module", autouse=True)
def interpret():
    """CPU: the kernel module runs in Triton's interpreter (conftest.triton_interpreter)."""
    from conftest import triton_interpreter

    yield from triton_interpreter("attnlab.blocksparse.kernels.vertical_slash_triton")


def _inputs(seed, B=1, Hk=2, G=2, N=256, D=16, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hk * G, N, D, generator=g, dtype=torch.float64) * 2
    kv = torch.randn(B, Hk, N, D, generator=g, dtype=torch.float64) * 2
    return q.to(dtype), kv.to(dtype)


def test_triton_stats_match_float64_loop():
    from attnlab.blocksparse.kernels.vertical_slash_triton import vs_stats_triton

    q, kv = _inputs(0, N=192, D=12)  # N = 6 blocks of 32, a head dim that is not a power of two
    G, L, bs, N = 2, 16, 32, 192
    rows = torch.tensor([0, 5, 40, 77, 131, 191])
    pos = torch.cat([torch.arange(N - L, N), rows])
    qr = q[:, :, pos].contiguous()
    vert, slash, mass = vs_stats_triton(qr, kv, pos, L, 12 ** -0.5, G, bs, n_split=4)  # 4 splits of 6 blocks
    s = (qr @ kv.repeat_interleave(G, 1).transpose(-1, -2)) * 12 ** -0.5
    a = s.masked_fill(torch.arange(N).view(1, -1) > pos.view(-1, 1), float("-inf")).softmax(-1)
    slash_ref = torch.zeros_like(vert, dtype=torch.float64)
    for r in range(L):
        for o in range(int(pos[r]) + 1):
            slash_ref[..., o] += a[:, :, r, int(pos[r]) - o]
    torch.testing.assert_close(vert.double(), a[:, :, :L].sum(2), atol=2e-6, rtol=0)
    torch.testing.assert_close(slash.double(), slash_ref, atol=2e-6, rtol=0)
    torch.testing.assert_close(mass.double(), a[:, :, L:].reshape(1, 4, 6, N // bs, bs).sum(-1), atol=2e-6, rtol=0)


@pytest.mark.parametrize("repeated", [True, False])
def test_triton_backend_gives_the_eager_pattern(repeated):
    q, kv = _inputs(1)
    G, bs = 2, 32
    k = kv.repeat_interleave(G, 1) if repeated else kv
    rows = sample_rows(q.shape[2], 12, 7, 1)
    params = VSParams(**SMALL, block_size=bs)
    g = torch.Generator().manual_seed(2)
    for knob in (torch.rand(4, generator=g, dtype=torch.float64) * 3, torch.full((4,), 0.05, dtype=torch.float64)):
        ref = vertical_slash_fast(q, k, knob, 16 ** -0.5, rows, params, G, stats="eager")
        fused = vertical_slash_fast(q, k, knob, 16 ** -0.5, rows, params, G, stats="triton")
        assert torch.equal(kv_to_block_graph(ref.kv), kv_to_block_graph(fused.kv))
        torch.testing.assert_close(fused.recall.double(), ref.recall.double(), atol=1e-5, rtol=0)
        torch.testing.assert_close(fused.density, ref.density)
    plan = plan_for(q, k, 16 ** -0.5, rows, params, G, stats="triton")
    again = plan.run(q, k, knob)
    assert plan.stats == "triton" and torch.equal(kv_to_block_graph(again.kv), kv_to_block_graph(fused.kv))


def test_stats_backend_is_checked():
    q, kv = _inputs(3)
    with pytest.raises(ConfigError, match="stats backend"):
        vertical_slash_fast(q, kv, torch.ones(4), 0.25, torch.tensor([3]), VSParams(**SMALL, block_size=32), 2,
                            stats="fast")


@pytest.mark.gpu
def test_triton_stats_on_cuda_match_eager_bf16():
    """bf16 on CUDA at the 8B-shaped head geometry: fused and eager stats give the same pattern up to near-ties."""
    if not CUDA:
        pytest.skip("needs CUDA")
    g = torch.Generator().manual_seed(4)
    B, Hk, G, N, D, bs = 1, 8, 4, 8192, 128, 128
    q = (torch.randn(B, Hk * G, N, D, generator=g) * 1.5).cuda().bfloat16()
    kv = (torch.randn(B, Hk, N, D, generator=g) * 1.5).cuda().bfloat16()
    rows = sample_rows(N, 64, 7, 1)
    knob = (torch.rand(Hk * G, generator=g) * 1.5).cuda()
    ref = vertical_slash_fast(q, kv, knob, D ** -0.5, rows, VSParams(block_size=bs), G, stats="eager")
    plan = plan_for(q, kv, D ** -0.5, rows, VSParams(block_size=bs), G, stats="triton")
    assert plan.graphed, plan.why_eager
    res = plan.run(q, kv, knob)
    agree = (kv_to_block_graph(ref.kv) == kv_to_block_graph(res.kv)).float().mean()
    assert agree > 0.995 and (res.recall - ref.recall).abs().max() < 5e-3
