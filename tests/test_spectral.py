"""Streaming statistics, eigen analysis and overlaps against one-shot float64 references."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attnlab.errors import ConfigError, NumericalError, ShapeError
from attnlab.spectral.eigen import (explained_variance, principal_angles, rank_for, ranks_for,
                                    subspace_similarity)
from attnlab.spectral.stats import StreamingSketch, StreamingCovariance, row_centre, sketch_covariance_eig


@settings(max_examples=25, deadline=None)
@given(n=st.integers(3, 60), d=st.integers(1, 12), cut=st.floats(0.05, 0.95), offset=st.floats(-1e4, 1e4),
       seed=st.integers(0, 2**31 - 1))
def test_streaming_covariance_matches_numpy_and_merges(n, d, cut, offset, seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)) * rng.uniform(0.1, 5, size=d) + offset
    ref = np.cov(x.T, ddof=1).reshape(d, d)
    whole = StreamingCovariance(d)
    for chunk in np.array_split(x, max(1, n // 7)):
        whole.update(torch.from_numpy(chunk))
    np.testing.assert_allclose(whole.covariance().numpy(), ref, rtol=1e-9, atol=1e-9 * max(1, abs(offset)))
    np.testing.assert_allclose(whole.mean.numpy(), x.mean(0), rtol=1e-12, atol=1e-9)
    k = max(1, min(n - 1, int(cut * n)))
    a, b = StreamingCovariance(d).update(torch.from_numpy(x[:k])), StreamingCovariance(d).update(torch.from_numpy(x[k:]))
    a.merge(b)
    np.testing.assert_allclose(a.covariance().numpy(), ref, rtol=1e-9, atol=1e-9 * max(1, abs(offset)))
    diag = StreamingCovariance(d, diag_only=True).update(torch.from_numpy(x))
    np.testing.assert_allclose(diag.covariance().numpy(), np.diag(ref), rtol=1e-9, atol=1e-9 * max(1, abs(offset)))


def test_large_logits_beat_naive_float32():
    """Logits around 1e4 with unit spread: a float32 sum of squares loses the variance; ours does not."""
    g = torch.Generator().manual_seed(0)
    x = 1e4 + torch.randn(20000, 4, generator=g, dtype=torch.float64)
    ref = np.cov(x.numpy().T)
    s = StreamingCovariance(4)
    for chunk in x.float().split(1000):
        s.update(chunk)
    np.testing.assert_allclose(s.covariance().numpy(), ref, rtol=1e-3, atol=2e-3)
    x32 = x.float()
    naive = (x32.T @ x32) / len(x32) - torch.outer(x32.mean(0), x32.mean(0))
    assert np.abs(naive.double().numpy() - ref).max() > 0.1  # the naive route is badly wrong


def test_nan_and_shape_errors():
    s = StreamingCovariance(3)
    with pytest.raises(NumericalError):
        s.update(torch.tensor([[1.0, float("nan"), 2.0]]))
    with pytest.raises(ShapeError):
        s.update(torch.zeros(2, 4))
    with pytest.raises(NumericalError, match="more than"):
        StreamingCovariance(3).update(torch.zeros(1, 3)).covariance()


def test_overlap_self_one_complement_zero():
    q, _ = torch.linalg.qr(torch.randn(20, 20, dtype=torch.float64))
    u, comp = q[:, :5], q[:, 5:10]
    assert subspace_similarity(u, u) == pytest.approx(1.0, abs=1e-12)
    assert subspace_similarity(u, comp) == pytest.approx(0.0, abs=1e-12)
    assert subspace_similarity(u, u @ torch.randn(5, 5, dtype=torch.float64)) == pytest.approx(1.0, abs=1e-9)
    np.testing.assert_allclose(principal_angles(u, u), 0, atol=1e-7)
    np.testing.assert_allclose(principal_angles(u, comp), np.pi / 2, atol=1e-7)
    with pytest.raises(ShapeError):
        subspace_similarity(u, torch.randn(19, 5))


def test_rank_for_levels():
    curve = explained_variance(torch.tensor([5.0, 3.0, 1.5, 0.5]))
    assert curve.tolist() == pytest.approx([0.5, 0.8, 0.95, 1.0])
    assert ranks_for(curve) == {"k90": 3, "k95": 3, "k99": 4}
    assert rank_for(curve, 0.5) == 1
    with pytest.raises(ConfigError):
        rank_for(curve, 1.5)


def test_streaming_sketch_recovers_low_rank_covariance():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(400, 5, generator=g, dtype=torch.float64) @ torch.randn(5, 200, generator=g, dtype=torch.float64)
    X = X + 0.01 * torch.randn(400, 200, generator=g, dtype=torch.float64) + 3.0
    fd, diag = StreamingSketch(200, 12), StreamingCovariance(200, diag_only=True)
    for chunk in X.split(50):
        fd.update(chunk)
        diag.update(chunk)
    evals, vecs = sketch_covariance_eig(fd.sketch(), diag.mean, diag.n, 5)
    ref_vals, ref_vecs = np.linalg.eigh(np.cov(X.numpy().T))
    ref_vals, ref_vecs = ref_vals[::-1][:5], ref_vecs[:, ::-1][:, :5]
    np.testing.assert_allclose(evals.numpy(), ref_vals, rtol=1e-3)
    assert subspace_similarity(vecs, ref_vecs) > 0.999
    a, b = StreamingSketch(200, 12).update(X[:200]), StreamingSketch(200, 12).update(X[200:])
    ev2, _ = sketch_covariance_eig(a.merge(b).sketch(), diag.mean, diag.n, 5)
    np.testing.assert_allclose(ev2.numpy(), ref_vals, rtol=1e-3)


def test_row_centre_ignores_masked_keys():
    s = torch.tensor([[[[1.0, 3.0, float("-inf")], [2.0, 2.0, 8.0]]]])
    valid = torch.isfinite(s)
    c = row_centre(s, valid)
    assert c[0, 0, 0].tolist() == [-1.0, 1.0, 0.0]
    assert c[0, 0, 1].tolist() == [-2.0, -2.0, 4.0]


def test_spectrum_run_resume_and_determinism(tmp_path, minilm):
    from attnlab.spectral.run import spectrum

    kw = dict(n_sequences=12, seq_len=32, batch_size=2, layers=[0, 3], heads=[0, 1, 2], sketch_size=4,
              checkpoint_every=1, progress=False)
    a = spectrum(tmp_path / "a", model=minilm, **kw)
    b = spectrum(tmp_path / "b", model=minilm, **kw)
    assert json.dumps(a["per_head"], sort_keys=True) == json.dumps(b["per_head"], sort_keys=True)
    assert a["n_rows"]["0.0"] == 12 * 32
    assert len(a["overlap_layers"]) == 2 and a["overlap_layers"][0][0] == pytest.approx(1.0)
    for f in ("results.json", "spectrum.safetensors", "spectrum_curves.png", "spectrum_k90.png"):
        assert (tmp_path / "a" / f).exists()

    # Interrupt after 3 batches, then resume: same numbers as the uninterrupted run.
    import attnlab.spectral.run as run_mod

    calls = {"n": 0}
    original = run_mod.stream_attention

    def interrupted(*args, **kwargs):
        cb = kwargs["on_batch_end"]

        def stop_after_three(i):
            cb(i)
            calls["n"] += 1
            if calls["n"] == 3:
                raise KeyboardInterrupt

        kwargs["on_batch_end"] = stop_after_three
        return original(*args, **kwargs)

    run_mod.stream_attention = interrupted
    try:
        with pytest.raises(KeyboardInterrupt):
            spectrum(tmp_path / "c", model=minilm, **kw)
    finally:
        run_mod.stream_attention = original
    assert (tmp_path / "c" / "spectrum.ckpt.rank0.safetensors").exists()
    c = spectrum(tmp_path / "c", model=minilm, resume=True, **kw)
    assert json.dumps(c["per_head"], sort_keys=True) == json.dumps(a["per_head"], sort_keys=True)
    assert not (tmp_path / "c" / "spectrum.ckpt.rank0.safetensors").exists()


def test_grouped_statistics_equal_separate():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 50, 6, generator=g, dtype=torch.float64) * 2 + 7
    grouped = StreamingCovariance(6, groups=3)
    for chunk in x.split(13, dim=1):
        grouped.update(chunk)
    for i in range(3):
        single = StreamingCovariance(6).update(x[i])
        torch.testing.assert_close(grouped.group(i).covariance(), single.covariance(), rtol=1e-12, atol=1e-12)
    fd = StreamingSketch(6, 3, groups=3).update(x)
    assert fd.sketch().shape == (3, 3, 6)


@pytest.mark.parametrize("shrink", [False, True])
def test_sketch_eigenvalues_are_lower_bounds(shrink):
    g = torch.Generator().manual_seed(5)
    spec = 1.0 / (1 + torch.arange(60.0, dtype=torch.float64)) ** 0.8
    X = (torch.randn(120, 60, generator=g, dtype=torch.float64) * spec.sqrt()) @ torch.randn(60, 300, generator=g,
                                                                                             dtype=torch.float64)
    sk = StreamingSketch(300, 10, shrink=shrink)
    for chunk in X.split(8):
        sk.update(chunk)
    got = torch.linalg.svdvals(sk.sketch()) ** 2
    ref = torch.linalg.svdvals(X)[:10] ** 2
    assert (got <= ref * (1 + 1e-9)).all()
    if not shrink:
        assert (got[:3] / ref[:3]).min() > 0.95  # truncation keeps the leading eigenvalues accurate


def test_pooled_heads_weight_equally_and_exclude_mean_differences():
    from attnlab.spectral.analysis import pooled_within

    g = torch.Generator().manual_seed(7)
    a = torch.randn(500, 4, generator=g, dtype=torch.float64)
    b = 30 * torch.randn(500, 4, generator=g, dtype=torch.float64) + torch.tensor([100.0, -50, 0, 0],
                                                                                  dtype=torch.float64)
    pooled = pooled_within([StreamingCovariance(4).update(a), StreamingCovariance(4).update(b)])
    ca, cb = np.cov(a.numpy().T), np.cov(b.numpy().T)
    np.testing.assert_allclose(pooled.numpy(), (ca / np.trace(ca) + cb / np.trace(cb)) / 2, rtol=1e-10)
    assert np.trace(pooled.numpy()) == pytest.approx(1.0)  # neither the scale of b nor its mean offset dominates
