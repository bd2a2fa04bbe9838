"""Sparse prefill with an estimated remainder (float64 CPU): the merge, the estimators against dense references,
GQA, partial tiles, bounds, cost and bad input."""

from __future__ import annotations

import math

import pytest
import torch

from attnlab.errors import ConfigError, ShapeError
from attnlab.blocksparse.remainder import (
    REMAINDERS,
    CalibratedRemainder,
    GaussianRemainder,
    HybridRemainder,
    PooledRemainder,
    add_remainder,
    dropped_tiles,
    estimate_remainder,
    masked_out_lse,
    merge_remainder,
    remainder_bounds,
    remainder_cost,
)

F64 = torch.float64


def _rand(B=1, H=4, Hk=2, N=64, d=8, seed=0, sq=1.5, sk=1.5):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, N, d, generator=g, dtype=F64) * sq
    k = torch.randn(B, Hk, N, d, generator=g, dtype=F64) * sk
    v = torch.randn(B, Hk, N, d, generator=g, dtype=F64)
    return q, k, v


def _keep(B, H, N, bs, frac=0.3, seed=1):
    nt = -(-N // bs)
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(B, H, nt, nt, generator=g) < frac
    return keep | torch.eye(nt, dtype=torch.bool)


def _dense(q, k, v):
    nt = 1
    full = torch.ones(q.shape[0], q.shape[1], nt, nt, dtype=torch.bool)
    return masked_out_lse(q, k, v, full, q.shape[2])


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def _exact_dropped(q, k, v, keep, bs):
    """Exact log mass and mean value of every row's dropped tiles (B, H, N), (B, H, N, d)."""
    B, H, N, d = q.shape
    g = H // k.shape[1]
    kk, vv = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    drop = dropped_tiles(keep).expand(B, H, -1, -1)
    drop = drop.repeat_interleave(bs, 2).repeat_interleave(bs, 3)[:, :, :N, :N]
    s = (q @ kk.transpose(-1, -2)) * d ** -0.5
    s = s.masked_fill(~drop, -math.inf)
    L = torch.logsumexp(s, -1)
    p = torch.nan_to_num(torch.softmax(s, -1), nan=0.0)
    return L, p @ vv


def test_none_returns_out_unchanged_and_all_kept_adds_nothing():
    q, k, v = _rand(N=70)
    keep = _keep(1, 4, 70, 16)
    out, lse = masked_out_lse(q, k, v, keep, 16)
    assert add_remainder(q, k, v, keep, 16, out, lse, "none") is out
    full = torch.ones_like(keep)
    out_f, lse_f = masked_out_lse(q, k, v, full, 16)
    ref, _ = _dense(q, k, v)
    torch.testing.assert_close(out_f, ref, rtol=1e-12, atol=1e-12)
    for m in REMAINDERS.names():
        assert torch.equal(add_remainder(q, k, v, full, 16, out_f, lse_f, m), out_f), m
        # future tiles marked dropped are ignored: still nothing to add
        tri = full & torch.ones(5, 5, dtype=torch.bool).tril()
        assert torch.equal(add_remainder(q, k, v, tri, 16, out_f, lse_f, m), out_f), m


def test_merge_with_the_exact_remainder_is_dense_attention():
    q, k, v = _rand(N=77, seed=3)
    keep = _keep(1, 4, 77, 8, 0.3)
    out, lse = masked_out_lse(q, k, v, keep, 8)
    L, V = _exact_dropped(q, k, v, keep, 8)
    merged, tot = merge_remainder(out, lse, L, V)
    ref, ref_lse = _dense(q, k, v)
    assert _rel(out, ref) > 0.1  # a real dropped mass
    torch.testing.assert_close(merged, ref, rtol=1e-11, atol=1e-11)
    torch.testing.assert_close(tot, ref_lse, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("method", ["pooled", "pooled-sub4", "gaussian", "gaussian-r4"])
def test_identical_keys_in_each_tile_make_the_estimate_exact(method):
    q, k, v = _rand(N=64, seed=4, sk=3.0)
    bs = 8
    k = k.view(1, 2, 8, bs, 8)[:, :, :, :1].expand(1, 2, 8, bs, 8).reshape(1, 2, 64, 8).contiguous()
    keep = _keep(1, 4, 64, bs, 0.2)
    out, lse = masked_out_lse(q, k, v, keep, bs)
    ref, _ = _dense(q, k, v)
    assert _rel(out, ref) > 0.1
    torch.testing.assert_close(add_remainder(q, k, v, keep, bs, out, lse, method), ref, rtol=1e-11, atol=1e-11)


def _paired_keys(eps: float, seed: int = 5, N: int = 64, bs: int = 16, d: int = 8):
    """Keys mu_t + eps u_j with u in +- pairs inside each tile (zero mean, zero third cumulant); values affine in
    the keys plus a per-tile offset, so the tilted value mean is E_w[k] mapped linearly."""
    g = torch.Generator().manual_seed(seed)
    nt = N // bs
    mu = torch.randn(1, 2, nt, 1, d, generator=g, dtype=F64) * 1.5
    u = torch.randn(1, 2, nt, bs // 2, d, generator=g, dtype=F64)
    k = (mu + eps * torch.cat([u, -u], 3)).reshape(1, 2, N, d)
    A = torch.randn(d, d, generator=g, dtype=F64)
    off = torch.randn(1, 2, nt, 1, d, generator=g, dtype=F64)
    v = (k.view(1, 2, nt, bs, d) @ A + off).reshape(1, 2, N, d)
    q = torch.randn(1, 4, N, d, generator=g, dtype=F64) * 1.5
    return q, k, v


class _Biased(PooledRemainder):
    """Pooled with a constant log-mass error (for the calibration test)."""

    def log_mass(self, a, st):
        L, s = super().log_mass(a, st)
        return L + 1.5, s


def test_calibration_removes_a_constant_log_mass_bias():
    q, k, v = _rand(N=64, seed=4, sk=3.0)
    k = k.view(1, 2, 8, 8, 8)[:, :, :, :1].expand(1, 2, 8, 8, 8).reshape(1, 2, 64, 8).contiguous()
    keep = _keep(1, 4, 64, 8, 0.2)
    out, lse = masked_out_lse(q, k, v, keep, 8)
    ref, _ = _dense(q, k, v)
    assert _rel(add_remainder(q, k, v, keep, 8, out, lse, _Biased()), ref) > 0.05
    got = add_remainder(q, k, v, keep, 8, out, lse, CalibratedRemainder(_Biased(), rows=16))
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)


def test_gaussian_is_second_order_exact_pooled_first():
    """Halving the within-tile spread: pooled's error falls ~4x (O(eps^2)); the Gaussian's ~16x (O(eps^4):
    the cumulant expansion of log E e^{a.k} and the tilted mean are exact to second order)."""
    bs, errs = 16, {"pooled": [], "gaussian": []}
    for eps in (0.2, 0.1, 0.05):
        q, k, v = _paired_keys(eps, bs=bs)
        keep = _keep(1, 4, 64, bs, 0.0, seed=2)
        out, lse = masked_out_lse(q, k, v, keep, bs)
        ref, _ = _dense(q, k, v)
        for m in errs:
            errs[m].append(_rel(add_remainder(q, k, v, keep, bs, out, lse, m), ref))
    for a, b in zip(errs["pooled"], errs["pooled"][1:]):
        assert 3.0 < a / b < 5.0, errs
    for a, b in zip(errs["gaussian"], errs["gaussian"][1:]):
        assert a / b > 10.0, errs
    assert all(g < 0.05 * p for g, p in zip(errs["gaussian"], errs["pooled"])), errs


def test_gaussian_full_rank_equals_rank_d_and_value_correction_matters():
    q, k, v = _paired_keys(0.3)
    keep = _keep(1, 4, 64, 16, 0.0, seed=2)
    out, lse = masked_out_lse(q, k, v, keep, 16)
    full = add_remainder(q, k, v, keep, 16, out, lse, "gaussian")
    torch.testing.assert_close(add_remainder(q, k, v, keep, 16, out, lse, GaussianRemainder(rank=8)), full,
                               rtol=1e-10, atol=1e-10)
    ref, _ = _dense(q, k, v)
    no_corr = add_remainder(q, k, v, keep, 16, out, lse, GaussianRemainder(value_correction=False))
    assert _rel(full, ref) < 0.5 * _rel(no_corr, ref)


def test_hybrid_is_exact_with_every_key_exact_or_identical_rest():
    q, k, v = _rand(N=64, seed=21, sk=2.0)
    keep = _keep(1, 4, 64, 16, 0.2)
    out, lse = masked_out_lse(q, k, v, keep, 16)
    ref, _ = _dense(q, k, v)
    assert _rel(out, ref) > 0.1
    for sel in ("probe", "norm"):  # every key of a tile exact: the remainder is exact
        got = add_remainder(q, k, v, keep, 16, out, lse, HybridRemainder(m=16, select=sel))
        torch.testing.assert_close(got, ref, rtol=1e-11, atol=1e-11)
    # identical keys per tile except 2 large-norm outliers: norm selection takes the outliers, pooled the rest
    g = torch.Generator().manual_seed(22)
    base = torch.randn(1, 2, 4, 1, 8, generator=g, dtype=F64).expand(1, 2, 4, 16, 8).clone()
    base[:, :, :, [3, 11]] = 4.0 * torch.randn(1, 2, 4, 2, 8, generator=g, dtype=F64)
    k2 = base.reshape(1, 2, 64, 8)
    out2, lse2 = masked_out_lse(q, k2, v, keep, 16)
    ref2, _ = _dense(q, k2, v)
    got = add_remainder(q, k2, v, keep, 16, out2, lse2, HybridRemainder(m=2, select="norm"))
    torch.testing.assert_close(got, ref2, rtol=1e-11, atol=1e-11)
    assert _rel(add_remainder(q, k2, v, keep, 16, out2, lse2, "pooled"), ref2) > 1e-3  # pooled alone is not


def test_rem_tail_equals_gaussian_below_freezing_and_is_closer_above():
    q, k, v = _paired_keys(0.1)
    keep = _keep(1, 4, 64, 16, 0.0, seed=2)
    out, lse = masked_out_lse(q, k, v, keep, 16)
    torch.testing.assert_close(add_remainder(q, k, v, keep, 16, out, lse, "gaussian-rem"),
                               add_remainder(q, k, v, keep, 16, out, lse, "gaussian"), rtol=1e-12, atol=1e-12)
    # one query, one dropped tile of 64 iid keys with score spread ~6 (sigma_c = sqrt(2 log 64) ~ 2.9)
    g = torch.Generator().manual_seed(23)
    k = torch.randn(1, 1, 128, 4, generator=g, dtype=F64) * 6.0
    q = torch.zeros(1, 1, 128, 4, dtype=F64)
    q[..., 0] = 2.0  # a = q / sqrt(4) = e_0: scores = k[..., 0]
    keep = torch.eye(2, dtype=torch.bool).view(1, 1, 2, 2)
    L_true, _ = _exact_dropped(q, k, k, keep, 64)
    errs = {}
    for tail in ("gaussian", "rem"):
        L, _ = estimate_remainder(q, k, k, keep, 64, GaussianRemainder(tail=tail, clamp=False))
        errs[tail] = float((L - L_true)[0, 0, 64:].mean())
    # both overestimate (the asymptotic sigma_c = sqrt(2 log c) exceeds the expected max of 64 normals, ~2.4 sigma),
    # the frozen tail by less than half as much
    assert 0 < errs["rem"] < 0.5 * errs["gaussian"], errs


def _naive(q, k, v, keep, bs, out, lse, est):
    """Row-by-row, tile-by-tile evaluation of the merge formula (pooled / gaussian, full covariance, no clamp)."""
    B, H, N, d = q.shape
    g = H // k.shape[1]
    res = out.clone()
    nt = keep.shape[-1]
    for b in range(B):
        for h in range(H):
            kh, vh = k[b, h // g], v[b, h // g]
            for i in range(N):
                a = q[b, h, i] * d ** -0.5
                num, den = math.exp(lse[b, h, i]) * out[b, h, i], math.exp(lse[b, h, i])
                for t in range(nt):
                    if t >= i // bs or keep[min(b, keep.shape[0] - 1), h, i // bs, t]:
                        continue
                    kt, vt = kh[t * bs:(t + 1) * bs], vh[t * bs:(t + 1) * bs]
                    mu, vb = kt.mean(0), vt.mean(0)
                    Lt, Vt = math.log(kt.shape[0]) + float(a @ mu), vb
                    if isinstance(est, GaussianRemainder):
                        dk, dv = kt - mu, vt - vb
                        Lt += 0.5 * float(a @ (dk.T @ dk / kt.shape[0]) @ a)
                        Vt = vb + (dv.T @ dk / kt.shape[0]) @ a
                    num, den = num + math.exp(Lt) * Vt, den + math.exp(Lt)
                res[b, h, i] = num / den
    return res


@pytest.mark.parametrize("est", [PooledRemainder(), GaussianRemainder(clamp=False)])
def test_partial_last_tile_gqa_and_batch_masks_match_the_naive_formula(est):
    q, k, v = _rand(B=2, H=4, Hk=2, N=45, d=4, seed=7, sk=0.8)
    keep = _keep(2, 4, 45, 8, 0.3, seed=9)
    out, lse = masked_out_lse(q, k, v, keep, 8)
    got = add_remainder(q, k, v, keep, 8, out, lse, est)
    torch.testing.assert_close(got, _naive(q, k, v, keep, 8, out, lse, est), rtol=1e-10, atol=1e-10)


def test_gqa_equals_expanded_heads_and_broadcast_keep():
    q, k, v = _rand(B=2, H=6, Hk=2, N=50, seed=11)
    keep = _keep(1, 6, 50, 8, 0.3)
    out, lse = masked_out_lse(q, k, v, keep, 8)
    out2, lse2 = masked_out_lse(q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1), keep.expand(2, -1, -1, -1), 8)
    torch.testing.assert_close(out, out2)
    for m in ("pooled", "gaussian"):
        a = add_remainder(q, k, v, keep, 8, out, lse, m)
        b = add_remainder(q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1), keep.expand(2, -1, -1, -1), 8,
                          out2, lse2, m)
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11)


def test_clustered_keys_remainder_reduces_error_gaussian_best():
    """Keys clustered per tile (centre + moderate spread): both estimates beat sparse-only, gaussian beats pooled."""
    g = torch.Generator().manual_seed(13)
    N, bs, d = 128, 16, 8
    centres = torch.randn(1, 2, N // bs, 1, d, generator=g, dtype=F64) * 2.0
    k = (centres + 0.4 * torch.randn(1, 2, N // bs, bs, d, generator=g, dtype=F64)).reshape(1, 2, N, d)
    v = torch.randn(1, 2, N, d, generator=g, dtype=F64) + k @ torch.randn(d, d, generator=g, dtype=F64) * 0.3
    q = torch.randn(1, 4, N, d, generator=g, dtype=F64) * 1.5
    keep = _keep(1, 4, N, bs, 0.25, seed=3)
    out, lse = masked_out_lse(q, k, v, keep, bs)
    ref, _ = _dense(q, k, v)
    e0 = _rel(out, ref)
    ep = _rel(add_remainder(q, k, v, keep, bs, out, lse, "pooled"), ref)
    eg = _rel(add_remainder(q, k, v, keep, bs, out, lse, "gaussian"), ref)
    assert e0 > 0.2 and ep < 0.5 * e0 and eg < 0.7 * ep, (e0, ep, eg)


def test_bounds_contain_the_true_dropped_mass():
    q, k, v = _rand(N=90, seed=17, sk=2.0)
    keep = _keep(1, 4, 90, 8, 0.3)
    lo, hi = remainder_bounds(q, k, keep, 8)
    L, _ = _exact_dropped(q, k, v, keep, 8)
    fin = torch.isfinite(L)
    assert torch.equal(torch.isfinite(lo), fin) and torch.equal(torch.isfinite(hi), fin) and fin.sum() > 100
    assert bool((lo[fin] <= L[fin] + 1e-12).all()) and bool((hi[fin] >= L[fin] - 1e-12).all())
    assert float((L[fin] - lo[fin]).mean()) > 0.01  # Jensen is strict on spread keys


def test_cost_counts_dropped_pairs():
    keep = torch.ones(1, 2, 4, 4, dtype=torch.bool)
    keep[0, 0, 3, 0] = keep[0, 1, 2, 1] = keep[0, 1, 3, 0] = False  # 3 dropped tiles; query tile 3 has 10 rows
    c = remainder_cost(keep, 16, 58, 8, "pooled", n_kv_heads=1)
    assert c["pair_macs"] == pytest.approx((10 + 16 + 10) * 16)
    assert c["stats_macs"] == pytest.approx(4 * 16 * 16)
    assert c["dense_macs"] == pytest.approx(2 * 10 * 2 * 16 * 16 * 8)
    assert c["fraction"] == pytest.approx(c["macs"] / c["dense_macs"])
    assert remainder_cost(keep, 16, 58, 8, "none")["macs"] == 0.0
    assert remainder_cost(torch.ones_like(keep), 16, 58, 8, "gaussian")["macs"] == 0.0
    g, gr = remainder_cost(keep, 16, 58, 8, "gaussian"), remainder_cost(keep, 16, 58, 8, "gaussian-r4")
    assert g["pair_macs"] > gr["pair_macs"] > c["pair_macs"]
    h = remainder_cost(keep, 16, 58, 8, HybridRemainder(m=4, probe=8), n_kv_heads=1)
    assert h["pair_macs"] == pytest.approx((10 + 16 + 10) * (16 + 4 * 16))
    assert h["stats_macs"] == pytest.approx(4 * (16 * 16 + 16) + 2 * 8 * 58 * 9)  # tiles + probe scores (g=2)


def test_flex_lse_is_natural_log():
    """FlexAttention's returned lse (the prefill kernel's) is natural-log, as add_remainder expects. CPU eager flex
    applies the mask_mod (not the block lists), so the tile mask is given as a mask_mod here."""
    fa = pytest.importorskip("torch.nn.attention.flex_attention")
    q, k, v = _rand(H=2, Hk=2, N=64, d=16, seed=19)
    q, k, v = q.float(), k.float(), v.float()
    keep = _keep(1, 2, 64, 16, 0.3)

    def mask_mod(b, h, qi, ki):
        return keep[0, h, qi // 16, ki // 16] & (qi >= ki)

    try:
        bm = fa.create_block_mask(mask_mod, 1, 2, 64, 64, device="cpu", BLOCK_SIZE=16)
        out, aux = fa.flex_attention(q, k, v, block_mask=bm, return_aux=fa.AuxRequest(lse=True))
    except Exception as e:  # pragma: no cover - platform without a CPU flex path
        pytest.skip(f"flex_attention does not run on this CPU: {e}")
    ref_out, ref_lse = masked_out_lse(q, k, v, keep, 16)
    assert _rel(ref_out, _dense(q.double(), k.double(), v.double())[0]) > 0.05  # the mask matters
    torch.testing.assert_close(aux.lse.double(), ref_lse, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.double(), ref_out, rtol=1e-4, atol=1e-4)


def test_real_model_layer_remainder_beats_sparse_only(tiny_lm):
    """On the tiny LM's real q, k, v (oracle pattern at p=0.7), pooled and gaussian reduce the output error."""
    import torch as _t

    from attnlab.blocksparse.predictors import make_block_predictor
    from attnlab.blocksparse.prefill import prefill_hooks
    from attnlab.blocksparse.prefill.model import heldout_windows
    from attnlab.sources.hf import load_model

    hf = load_model(tiny_lm, device="cpu", dtype=_t.float64, head="causal-lm")
    ids = heldout_windows(hf, 128, 1)
    pred = make_block_predictor("oracle")
    errs: dict[str, list[float]] = {"none": [], "pooled": [], "gaussian": []}

    def handler(call):
        q, k, v = call.query.double(), call.key.double(), call.value.double()
        keep = pred.predict(q, k, causal=True, block_size=16, p=0.7, scale=call.scaling).pattern.block_graph()
        out, lse = masked_out_lse(q, k, v, keep, 16, scale=call.scaling)
        ref, _ = masked_out_lse(q, k, v, torch.ones_like(keep), 16, scale=call.scaling)
        for m in errs:
            errs[m].append(_rel(add_remainder(q, k, v, keep, 16, out, lse, m, scale=call.scaling), ref))
        return ref.to(call.query.dtype)

    with prefill_hooks(hf, handler), _t.no_grad():
        hf.model(input_ids=ids, use_cache=False)
    assert len(errs["none"]) == 2 and min(errs["none"]) > 0.01
    for e0, ep, eg in zip(errs["none"], errs["pooled"], errs["gaussian"]):
        assert ep < e0 and eg < e0, errs


def test_bad_input_names_the_argument():
    q, k, v = _rand(N=32)
    keep = _keep(1, 4, 32, 8)
    out, lse = masked_out_lse(q, k, v, keep, 8)
    with pytest.raises(ConfigError, match="--remainder"):
        add_remainder(q, k, v, keep, 8, out, lse, "nope")
    with pytest.raises(ConfigError, match="method"):
        add_remainder(q, k, v, keep, 8, out, lse, 3)
    with pytest.raises(ShapeError, match="keep"):
        add_remainder(q, k, v, keep[:, :, :3], 8, out, lse, "pooled")
    with pytest.raises(ConfigError, match="keep"):
        add_remainder(q, k, v, keep.int(), 8, out, lse, "pooled")
    bad = keep.clone()
    bad[0, 1, 2, 2] = False
    with pytest.raises(ConfigError, match="diagonal"):
        add_remainder(q, k, v, bad, 8, out, lse, "pooled")
    with pytest.raises(ShapeError, match="q must be"):
        add_remainder(q[0], k, v, keep, 8, out, lse, "pooled")
    with pytest.raises(ConfigError, match="k must be a floating"):
        add_remainder(q, k.long(), v, keep, 8, out, lse, "pooled")
    with pytest.raises(ShapeError, match="multiple of the key heads"):
        add_remainder(q, torch.cat([k, k[:, :1]], 1), torch.cat([v, v[:, :1]], 1), keep, 8, out, lse, "pooled")
    with pytest.raises(ShapeError, match="k must be"):
        add_remainder(q, k[:, :, :16], v[:, :, :16], keep, 8, out, lse, "pooled")
    with pytest.raises(ShapeError, match="v must be"):
        add_remainder(q, k, v[:, :, :16], keep, 8, out, lse, "pooled")
    with pytest.raises(ShapeError, match="out must be"):
        add_remainder(q, k, v, keep, 8, out[:, :2], lse, "pooled")
    with pytest.raises(ShapeError, match="lse must be"):
        add_remainder(q, k, v, keep, 8, out, lse[..., :5], "pooled")
    with pytest.raises(ConfigError, match="block"):
        add_remainder(q, k, v, keep, 8.0, out, lse, "pooled")
    with pytest.raises(ConfigError, match="sub-tiles"):
        k6 = _keep(1, 4, 32, 6)
        o6, l6 = masked_out_lse(q, k, v, k6, 6)
        add_remainder(q, k, v, k6, 6, o6, l6, "pooled-sub4")
    with pytest.raises(ConfigError, match="n and d"):
        remainder_cost(keep, 8, 0, 8, "pooled")
    # estimate_remainder shares the checks
    with pytest.raises(ShapeError, match="keep"):
        estimate_remainder(q, k, v, keep[..., :2], 8, "pooled")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_float32_matches_float64_cpu():
    """Every method on CUDA float32 tensors (device placement of every intermediate) against float64 on CPU."""
    q, k, v = _rand(B=1, H=4, Hk=2, N=200, d=16, seed=31)
    keep = _keep(1, 4, 200, 32, 0.3)
    out, lse = masked_out_lse(q, k, v, keep, 32)
    dev = torch.device("cuda")
    qc, kc, vc, keepc = q.float().to(dev), k.float().to(dev), v.float().to(dev), keep.to(dev)
    outc, lsec = masked_out_lse(qc, kc, vc, keepc, 32, dtype=torch.float32)
    for m in REMAINDERS.names():
        ref = add_remainder(q, k, v, keep, 32, out, lse, m)
        got = add_remainder(qc, kc, vc, keepc, 32, outc, lsec, m)
        assert got.device.type == "cuda" and got.dtype == torch.float32
        torch.testing.assert_close(got.double().cpu(), ref, rtol=2e-3, atol=2e-3)
        assert remainder_cost(keepc, 32, 200, 16, m)["macs"] == remainder_cost(keep, 32, 200, 16, m)["macs"]
