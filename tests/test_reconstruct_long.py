"""Long-context reconstruction (attnlab.reconstruct.long) on the tiny causal LM: float64 dense references,
chunked == unchunked, the memory bound, causal costs, and the chunked corpus fit (FitCollector)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from attnlab.errors import ConfigError, ModelError
from attnlab.reconstruct.long import (
    FAMILIES,
    Point,
    capture_qk,
    causal_cost,
    evaluate_head,
    fit_proxy,
    head_spectrum,
    row_budgets,
    sample_rows,
    spectrum_summary,
)
from attnlab.reconstruct.long_run import LongConfig, study_length

N = 48


@pytest.fixture(scope="module")
def lm(tiny_lm):
    from attnlab.sources.hf import load_model

    return load_model(tiny_lm)


@pytest.fixture(scope="module")
def cap(lm):
    g = torch.Generator().manual_seed(5)
    w = torch.randint(3, 259, (5, N), generator=g)
    return capture_qk(lm, w[:2], [0, 1], dtype=torch.float64), capture_qk(lm, w[2:], [0, 1], dtype=torch.float64)


POINTS = [Point("topb-none", 0.25, 2), Point("topb-proxy", 0.125, 2), Point("local-none", 0.25),
          Point("local-proxy", 0.25, 2), Point("proxy-only", 0.0, 2), Point("oracle-none", 0.25),
          Point("hybrid-none", 0.25, 2), Point("hybrid-proxy", 0.1875, 2)]


def _dense_reference(q, k, scaling, pt: Point, proxy) -> np.ndarray:
    """Per-window mean TV over all rows, one row at a time in float64 numpy (independent of the chunked code)."""
    q, k = q.double().numpy(), k.double().numpy()
    wq, wk = proxy.wq.double().numpy(), proxy.wk.double().numpy()
    out = []
    for w in range(q.shape[0]):
        tvs = []
        for i in range(q.shape[1]):
            n_i = i + 1
            s = k[w, :n_i] @ q[w, i] * scaling  # the causal row: keys 0..i only
            ps = (k[w, :n_i] @ wk) @ (wq.T @ q[w, i]) * scaling
            b = 0 if pt.frac == 0 else min(n_i, max(1, math.ceil(pt.frac * n_i - 1e-9)))
            fam = FAMILIES[pt.family]
            if fam.selection == "adaptive":
                sel = set(np.argsort(-ps, kind="stable")[:b].tolist())
            elif fam.selection == "oracle":
                sel = set(np.argsort(-s, kind="stable")[:b].tolist())
            elif fam.selection == "local":
                sel = {0} | {j for j in range(n_i) if j > i - b + 1}
            elif fam.selection == "hybrid":
                bl = b - b // 2
                loc = {0} | {j for j in range(n_i) if j > i - bl + 1}
                rest = [j for j in np.argsort(-ps, kind="stable").tolist() if j not in loc]
                sel = loc | set(rest[:b - bl])
            else:
                sel = set()
            m = np.array([j in sel for j in range(n_i)])
            if fam.fill == "none":
                est = np.where(m, s, -np.inf)
            else:  # proxy elsewhere, shifted so the row's total is the exact one
                shift = (s.sum() - s[m].sum() - ps[~m].sum()) / max((~m).sum(), 1)
                est = np.where(m, s, ps + shift)
            p = np.exp(s - s.max()); p /= p.sum()
            e = np.exp(est - est.max()); e /= e.sum()
            tvs.append(0.5 * np.abs(p - e).sum())
        out.append(np.mean(tvs))
    return np.array(out)


def test_causal_tv_matches_float64_dense_reference(cap):
    fit, ev = cap
    for layer, head in ((0, 1), (1, 3)):
        proxy = fit_proxy(fit.q[layer][:, head], fit.k[layer][:, head], 2)
        got = evaluate_head(ev.q[layer][:, head], ev.k[layer][:, head], [torch.arange(N)], ev.scaling, POINTS,
                            {2: proxy}, chunk=N)
        for pt in POINTS:
            want = _dense_reference(ev.q[layer][:, head], ev.k[layer][:, head], ev.scaling, pt, proxy)
            np.testing.assert_allclose(got[pt.label].numpy(), want, rtol=0, atol=1e-10, err_msg=pt.label)
        assert float(got[POINTS[0].label].mean()) > 1e-3  # not trivially exact


def test_every_family_is_exact_at_full_budget(cap):
    fit, ev = cap
    proxy = fit_proxy(fit.q[0][:, 0], fit.k[0][:, 0], 2)
    pts = [Point(f, 1.0, 2 if FAMILIES[f].uses_rank else 0) for f in FAMILIES if f != "proxy-only"]
    got = evaluate_head(ev.q[0][:, 0], ev.k[0][:, 0], [torch.arange(N)], ev.scaling, pts, {2: proxy}, chunk=16)
    for lab, v in got.items():
        assert float(v.abs().max()) < 1e-12, lab


def test_full_rank_proxy_is_exact(cap):
    fit, ev = cap
    d = ev.shape[-1]
    proxy = fit_proxy(fit.q[0][:, 2], fit.k[0][:, 2], d)
    got = evaluate_head(ev.q[0][:, 2], ev.k[0][:, 2], [torch.arange(N)], ev.scaling, [Point("proxy-only", 0.0, d)],
                        {d: proxy}, chunk=N)
    assert float(next(iter(got.values())).max()) < 1e-4


def test_chunked_equals_unchunked(cap):
    fit, ev = cap
    proxy = fit_proxy(fit.q[1][:, 0], fit.k[1][:, 0], 2)
    rows = sample_rows(N, 30, 1, 0)
    a = evaluate_head(ev.q[1][:, 0], ev.k[1][:, 0], rows, ev.scaling, POINTS, {2: proxy}, chunk=N)
    b = evaluate_head(ev.q[1][:, 0], ev.k[1][:, 0], rows, ev.scaling, POINTS, {2: proxy}, chunk=7)
    for lab in a:
        torch.testing.assert_close(a[lab], b[lab], rtol=0, atol=1e-13)
    srows = sample_rows(N, 60, 2, 1)
    e1 = head_spectrum(fit.q[1][:, 0], fit.k[1][:, 0], srows, fit.scaling, key_chunk=N)
    e2 = head_spectrum(fit.q[1][:, 0], fit.k[1][:, 0], srows, fit.scaling, key_chunk=5)
    torch.testing.assert_close(e1, e2, rtol=1e-10, atol=1e-12)


def test_spectrum_equals_corpus_fit_covariance(lm):
    """All rows sampled: the R x R Gram spectrum is the causal row covariance of the corpus fit (masked 0)."""
    from attnlab.reconstruct.fit import fit_from_windows

    g = torch.Generator().manual_seed(7)
    w = torch.randint(3, 259, (2, N), generator=g)
    fit = fit_from_windows(lm, w, [0], [0, 2], batch_size=2)
    c = capture_qk(lm, w, [0], dtype=torch.float64)
    for h in (0, 2):
        want = torch.linalg.eigvalsh(fit.row_model(0, h).cov).flip(0).clamp_min(0)
        got = head_spectrum(c.q[0][:, h], c.k[0][:, h], [torch.arange(N), torch.arange(N)], c.scaling, key_chunk=13)
        # the corpus fit forms scores in float32 (as call.scores); agreement to float32 accuracy
        torch.testing.assert_close(got[:N], want, rtol=1e-4, atol=1e-5 * float(want[0]))
        assert float(got[N:].abs().max()) < 1e-6 * float(want[0])  # at most N nonzero
        s = spectrum_summary(got, 2 * N)
        assert 1 <= s["k90"] <= s["k95"] <= s["k99"] <= N


class _MaxNumel(TorchDispatchMode):
    """Largest tensor any torch op produced while active."""

    def __init__(self):
        super().__init__()
        self.max = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.max = max(self.max, t.numel())
        return out


def test_memory_bound_one_chunk_of_rows():
    n, d, W, c, kc = 256, 8, 2, 16, 32
    g = torch.Generator().manual_seed(0)
    q = torch.randn(W, n, d, generator=g, dtype=torch.float64)
    k = torch.randn(W, n, d, generator=g, dtype=torch.float64)
    proxy = fit_proxy(q, k, 2)
    pts = [Point("topb-proxy", 0.25, 2), Point("local-none", 0.125), Point("oracle-none", 0.25)]
    with _MaxNumel() as m:
        evaluate_head(q, k, [torch.arange(n)], 0.3, pts, {2: proxy}, chunk=c)
    assert m.max <= max(W * c * n, W * n * d), m.max  # one chunk of rows (or q/k themselves)
    assert m.max < W * n * n // 4
    rows = sample_rows(n, 64, W, 0)
    with _MaxNumel() as m2:
        head_spectrum(q, k, rows, 0.3, key_chunk=kc)
    R = sum(len(r) for r in rows)
    assert m2.max <= max(R * R, R * kc, W * n * d), m2.max
    assert m2.max < n * n


def test_fit_collector_chunked_equals_unchunked(tiny_lm):
    from attnlab.reconstruct.fit import fit_from_windows
    from attnlab.sources.hf import load_model

    lm = load_model(tiny_lm, dtype=torch.float64)  # float64 scores: chunking must not change a bit beyond rounding
    g = torch.Generator().manual_seed(11)
    w = torch.randint(3, 259, (3, N), generator=g)
    a = fit_from_windows(lm, w, [0, 1], batch_size=2, chunk_rows=N)
    b = fit_from_windows(lm, w, [0, 1], batch_size=2, chunk_rows=5)
    assert a.t.keys() == b.t.keys()
    for key in a.t:
        torch.testing.assert_close(a.t[key], b.t[key], rtol=1e-12, atol=1e-10, msg=key)
    cov = a.row_model(1, 0).cov
    assert float(cov.diagonal()[-1]) > 0 and float(cov.abs().sum()) > 0


def test_causal_cost():
    n, d = 100, 16
    lengths = torch.arange(1, n + 1)
    for f in (0.1, 0.25, 0.5):
        b = row_budgets(f, lengths)
        exact = float(b.sum()) / float(lengths.sum())  # local-none: exactly the pairs computed
        assert causal_cost("none", "local", n, d, f)["compute"] == pytest.approx(exact, rel=1e-12)  # strata >= n: exact
        assert causal_cost("none", "local", 4000, d, f, strata=64)["compute"] == pytest.approx(f, abs=2e-3)
    assert causal_cost("proxy", "adaptive", n, d, 1.0, 2)["compute"] == pytest.approx(1.0)  # every row exact
    assert causal_cost("none", "oracle", n, d, 0.25)["compute"] > 1.0  # the reference never pays
    assert row_budgets(0.25, torch.tensor([1, 3, 4, 5])).tolist() == [1, 1, 1, 2]
    with pytest.raises(ConfigError, match="fraction"):
        row_budgets(1.5, lengths)


def test_study_length_end_to_end_and_errors(lm, minilm):
    g = torch.Generator().manual_seed(3)
    w = torch.randint(3, 259, (4, 32), generator=g)
    cfg = LongConfig(n_fit=2, n_eval=2, eval_rows=32, spectrum_rows=64, chunk_rows=8, dtype="float64",
                     fractions=(0.25,), ranks=(2,), max_compute=2.0)
    res = study_length(lm, w[:2], w[2:], cfg)
    assert res["seq_len"] == 32 and set(res["spectrum"]) == {f"{l}.{h}" for l in (0, 1) for h in range(4)}
    assert res["frontier"] and all(v["worst_layer_tv"]["n"] == 2 for v in res["frontier"].values())
    assert res["memory"]["eval_formula_bytes"] == (13 + 5 * 1) * 2 * 8 * 32 * 8
    with pytest.raises(ConfigError, match="--n-eval"):
        study_length(lm, w[:2], w[2:3], LongConfig(n_eval=1))
    with pytest.raises((ConfigError, ModelError), match="causal"):
        study_length(minilm, w[:2] % 1000, w[2:] % 1000, cfg)


@pytest.mark.gpu
def test_gpu_float32_matches_cpu_float64(cap):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    fit, ev = cap
    proxy = fit_proxy(fit.q[0][:, 0], fit.k[0][:, 0], 2)
    a = evaluate_head(ev.q[0][:, 0], ev.k[0][:, 0], [torch.arange(N)], ev.scaling, POINTS, {2: proxy}, chunk=16)
    b = evaluate_head(ev.q[0][:, 0].float().cuda(), ev.k[0][:, 0].float().cuda(), [torch.arange(N)], ev.scaling,
                      POINTS, {2: proxy}, chunk=16)
    for lab in a:
        torch.testing.assert_close(b[lab].double(), a[lab], rtol=0, atol=1e-4)


def test_cli_long_bad_input_names_the_flag(tiny_lm):
    from typer.testing import CliRunner

    from attnlab.cli import app

    r = CliRunner().invoke(app, ["reconstruct", "long", "--model", tiny_lm, "--lengths", "1", "--out", "/tmp/x_rl"])
    assert r.exit_code == 2 and "--lengths" in r.output, r.output
    r = CliRunner().invoke(app, ["reconstruct", "long", "--model", tiny_lm, "--n-eval", "1", "--out", "/tmp/x_rl"])
    assert r.exit_code == 2 and "--n-eval" in r.output, r.output
