"""Tests of attnlab.reconstruct: estimators vs a float64 reference, exactness, selections, metrics, fits,
drop-in attention on tiny HF models and MiniLM, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attnlab.errors import ConfigError, ShapeError
from attnlab.reconstruct.estimators import Estimator, ResidualEstimator, RowModel, reference_gaussian
from attnlab.reconstruct.metrics import kl_divergence, row_metrics, topk_agreement, total_variation
from attnlab.reconstruct.selection import STRATEGIES, budget_count, make_proxy, select


def _spd(n: int, g: torch.Generator) -> torch.Tensor:
    a = torch.randn(n, n, generator=g, dtype=torch.float64)
    return a @ a.T / n + 0.1 * torch.eye(n, dtype=torch.float64)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(3, 12), data=st.data(), seed=st.integers(0, 10_000), known=st.booleans())
def test_gaussian_matches_numpy_reference(n, data, seed, known):
    b = data.draw(st.integers(1, n - 1))
    g = torch.Generator().manual_seed(seed)
    cov, mean = _spd(n, g), torch.randn(n, generator=g, dtype=torch.float64)
    x = torch.randn(2, 3, n, generator=g, dtype=torch.float64) * 2
    idx = torch.randperm(n, generator=g)[:b].sort().values
    per_row = torch.stack([torch.randperm(n, generator=g)[:b].sort().values for _ in range(6)]).view(2, 3, b)
    rm = x.mean(-1) if known else None
    est = Estimator("gaussian", RowModel(mean, cov), jitter=0.0)
    for sel in (idx, per_row):
        out = est(x, sel, None, rm)
        for i in range(2):
            for j in range(3):
                s = (sel if sel.dim() == 1 else sel[i, j]).numpy()
                ref = reference_gaussian(x[i, j, s].numpy(), s, mean.numpy(), cov.numpy(), 0.0,
                                         None if rm is None else rm[i, j].item())
                np.testing.assert_allclose(out[i, j].numpy(), ref, rtol=1e-7, atol=1e-7)


def test_gaussian_is_exact_conditional_mean_on_gaussian_data():
    g = torch.Generator().manual_seed(0)
    n, m = 10, 40_000
    cov, mean = _spd(n, g), torch.randn(n, generator=g, dtype=torch.float64)
    x = mean + torch.randn(m, n, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(cov).T
    idx = torch.tensor([0, 3, 5, 8])
    est = Estimator("gaussian", RowModel(mean, cov), jitter=0.0)(x[None], idx, None, torch.zeros(1, m))[0]
    err = (x - est).numpy()
    rest = [j for j in range(n) if j not in idx.tolist()]
    c = cov.numpy()
    cond_var = np.diag(c[np.ix_(rest, rest)] - c[np.ix_(rest, idx)] @ np.linalg.solve(c[np.ix_(idx, idx)], c[np.ix_(idx, rest)]))
    np.testing.assert_allclose(err[:, rest].mean(0), 0.0, atol=0.03)  # unbiased
    np.testing.assert_allclose((err[:, rest] ** 2).mean(0), cond_var, rtol=0.05)  # error = conditional variance
    assert np.abs(err[:, idx.numpy()]).max() == 0.0  # observed entries exact


@pytest.mark.parametrize("kind", ["gaussian", "basis", "mean", "none"])
@pytest.mark.parametrize("known", [False, True])
def test_full_budget_returns_exact_scores(kind, known):
    g = torch.Generator().manual_seed(1)
    n = 9
    cov = _spd(n, g)
    x = torch.randn(2, n, n, generator=g, dtype=torch.float64)
    est = Estimator(kind, RowModel(torch.zeros(n, dtype=torch.float64), cov), k=3)
    out = est(x, torch.arange(n), None, x.mean(-1) if known else None)
    torch.testing.assert_close(out, x, rtol=0, atol=1e-9)
    valid = torch.ones(1, n, n, dtype=torch.bool).tril()
    xm = x.masked_fill(~valid, float("-inf"))
    out = est(xm, torch.arange(n), valid)
    assert torch.equal(torch.isinf(out), ~valid.expand_as(out))
    torch.testing.assert_close(out[valid.expand_as(out)], x[valid.expand_as(x)], rtol=0, atol=1e-9)


def test_masked_observed_keys_are_ignored_and_float32_path():
    g = torch.Generator().manual_seed(2)
    n = 8
    cov = _spd(n, g)
    x = torch.randn(3, n, n, generator=g)
    valid = torch.ones(1, n, n, dtype=torch.bool).tril()
    for kind in ("gaussian", "basis", "mean"):
        est = Estimator(kind, RowModel(torch.zeros(n, dtype=torch.float64), cov), k=2, dtype=torch.float32)
        out = est(x.masked_fill(~valid, float("-inf")), torch.tensor([0, 2, 5, 7]), valid)
        assert torch.isfinite(out[valid.expand_as(out)]).all()
        assert torch.isinf(out[~valid.expand_as(out)]).all()


@settings(max_examples=15, deadline=None)
@given(n=st.integers(3, 12), data=st.data(), seed=st.integers(0, 10_000), known=st.booleans())
def test_proxy_gaussian_is_proxy_plus_residual_conditional_mean(n, data, seed, known):
    """Truth = proxy + Gaussian residual with known statistics: the estimate is p + the exact conditional mean of
    the residual (float64 reference), with the residual's offset known (exact row mean) or estimated."""
    b = data.draw(st.integers(1, n - 1))
    g = torch.Generator().manual_seed(seed)
    cov, mean = _spd(n, g), torch.randn(n, generator=g, dtype=torch.float64)
    p = torch.randn(2, 3, n, generator=g, dtype=torch.float64) * 3
    resid = mean + torch.randn(2, 3, n, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(cov).T
    x = p + resid
    per_row = torch.stack([torch.randperm(n, generator=g)[:b].sort().values for _ in range(6)]).view(2, 3, b)
    est = ResidualEstimator(RowModel(mean, cov), jitter=0.0)
    for sel in (per_row[0, 0], per_row):
        out = est(x, p, sel, None, x.mean(-1) if known else None)
        torch.testing.assert_close(out, est(x, p, sel, None, x.mean(-1) if known else None), rtol=0, atol=0)
        for i in range(2):
            for j in range(3):
                s = (sel if sel.dim() == 1 else sel[i, j]).numpy()
                r = (x[i, j] - p[i, j]).numpy()
                ref = p[i, j].numpy() + reference_gaussian(r[s], s, mean.numpy(), cov.numpy(), 0.0,
                                                           r.mean() if known else None)
                np.testing.assert_allclose(out[i, j].numpy(), ref, rtol=1e-7, atol=1e-7)
                assert torch.equal(out[i, j, s], x[i, j, s])  # observed entries bit-exact


def test_proxy_gaussian_full_budget_and_mask():
    g = torch.Generator().manual_seed(4)
    n = 9
    x, p = (torch.randn(2, n, n, generator=g, dtype=torch.float64) for _ in range(2))
    est = ResidualEstimator(RowModel(torch.zeros(n, dtype=torch.float64), _spd(n, g)))
    torch.testing.assert_close(est(x, p, torch.arange(n), None, x.mean(-1)), x, rtol=0, atol=0)
    valid = torch.ones(1, n, n, dtype=torch.bool).tril()
    xm = x.masked_fill(~valid, float("-inf"))
    for sel in (torch.arange(n), torch.tensor([0, 3, 5])):
        rm = torch.where(valid, x, 0).sum(-1) / valid.sum(-1)
        out = est(xm.float(), p.float(), sel, valid, rm)
        assert out.dtype == torch.float32 and torch.equal(torch.isinf(out), ~valid.expand_as(out))
        assert torch.isfinite(out[valid.expand_as(out)]).all()
    with pytest.raises(ShapeError):
        est(x, p[:, :3], torch.arange(3))


@settings(max_examples=20, deadline=None)
@given(n=st.integers(2, 40), frac=st.floats(0.01, 1.0), seed=st.integers(0, 1000))
def test_selections_valid_unique_deterministic(n, frac, seed):
    b = budget_count(frac, n)
    g = torch.Generator().manual_seed(seed)
    cov = _spd(n, g)
    basis = torch.linalg.eigh(cov).eigenvectors[:, -min(b, n):]
    scores = torch.randn(2, n, n, generator=g)
    for strat in STRATEGIES:
        kw = dict(batch=2, cov=cov, basis=basis, proxy_scores=scores, scores=scores, seed=seed)
        a, a2 = select(strat, n, b, **kw), select(strat, n, b, **kw)
        assert torch.equal(a, a2), strat
        assert a.shape[-1] == b and a.min() >= 0 and a.max() < n
        flat = a.reshape(-1, b)
        assert (flat[:, 1:] > flat[:, :-1]).all(), f"{strat}: not sorted unique"


def test_local_window_and_oracle_contents():
    idx = select("local", 10, 4)
    assert idx.shape == (10, 4) and {0, 9} <= set(idx[5].tolist()) and 5 in idx[5].tolist()
    s = torch.zeros(1, 3, 6)
    s[0, :, 4] = 5.0
    assert all(4 in row for row in select("oracle", 6, 2, scores=s)[0].tolist())


def test_budget_parsing_and_errors():
    assert budget_count(0.25, 128) == 32 and budget_count(32, 128) == 32 and budget_count(1.0, 128) == 128
    with pytest.raises(ConfigError, match="--budget 200 exceeds --seq-len 128"):
        budget_count(200, 128)
    with pytest.raises(ConfigError):
        budget_count(1.5, 128)
    with pytest.raises(ConfigError, match="--k 40 exceeds --budget 32"):
        Estimator("basis", RowModel(torch.zeros(128, dtype=torch.float64), torch.eye(128, dtype=torch.float64)), k=40)(
            torch.randn(1, 4, 128), torch.arange(32))
    with pytest.raises(ConfigError):
        Estimator("magic", RowModel(torch.zeros(4), torch.eye(4)))
    with pytest.raises(ShapeError):
        Estimator("gaussian", RowModel(torch.zeros(4), torch.eye(4)))(torch.randn(1, 4, 5), torch.arange(2))


def test_proxy_bilinear_is_exact_at_full_rank():
    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(5, 6, generator=g), torch.randn(7, 6, generator=g)
    p = make_proxy("bilinear", 6, 6, _spd(6, g), _spd(6, g))
    torch.testing.assert_close(p.scores(q, k, 0.5), (q @ k.T) * 0.5, rtol=1e-4, atol=1e-4)
    with pytest.raises(ConfigError):
        make_proxy("bilinear", 7, 6, _spd(6, g), _spd(6, g))


def test_metrics_hand_made():
    p = torch.tensor([[0.2, 0.3, 0.5]])
    assert total_variation(p, p).item() == 0.0 and kl_divergence(p, p).abs().item() < 1e-12
    a, b = torch.tensor([[1.0, 0, 0]]), torch.tensor([[0, 1.0, 0]])
    assert total_variation(a, b).item() == 1.0 and topk_agreement(a, b, 1).item() == 0.0
    assert topk_agreement(p, p, 2).item() == 1.0
    s = torch.randn(2, 4, 6, dtype=torch.float64)
    m = row_metrics(s, s + 3.0)  # shift-invariant
    assert m["tv"].abs().max() < 1e-9 and m["rel_err"].abs().max() < 1e-9 and m["top1"].min() == 1


@settings(max_examples=20, deadline=None)
@given(n=st.integers(2, 16), seed=st.integers(0, 1000))
def test_metric_bounds(n, seed):
    g = torch.Generator().manual_seed(seed)
    s, t = torch.randn(3, n, generator=g), torch.randn(3, n, generator=g) * 3
    m = row_metrics(s, t, topk=n)
    assert ((m["tv"] >= 0) & (m["tv"] <= 1 + 1e-12)).all() and (m["kl"] >= -1e-12).all()
    assert (m["topk"] == 1).all()


# --- fits, drop-in, models ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_fit():
    from attnlab.models import SmallTransformer, TransformerConfig
    from attnlab.reconstruct.fit import fit_from_windows

    torch.manual_seed(0)
    m = SmallTransformer(TransformerConfig(vocab_size=50, d_model=32, n_heads=2, n_layers=2, max_len=16, causal=True))
    w = torch.randint(0, 50, (24, 16))
    return m, w, fit_from_windows(m, w, model_name="small", residual_proxies=[("bilinear", 4, 0)])


def test_fit_save_load_roundtrip_and_mismatch(small_fit, tmp_path):
    from attnlab.reconstruct.fit import ReconstructionFit

    _, _, fit = small_fit
    p = fit.save(tmp_path / "fit.safetensors")
    back = ReconstructionFit.load(p, model="small", seq_len=16)
    for pos in (False, True):
        a, b = fit.row_model(1, 1, position=pos), back.row_model(1, 1, position=pos)
        torch.testing.assert_close(a.cov, b.cov) and torch.testing.assert_close(a.mean, b.mean)
    with pytest.raises(ShapeError, match="--seq-len 16"):
        ReconstructionFit.load(p, seq_len=32)
    with pytest.raises(ConfigError, match="fitted on --model small"):
        ReconstructionFit.load(p, model="minilm")
    assert fit.row_model(0, 0, pool_heads=True).cov.shape == (16, 16)
    for pos in (False, True):
        a, b = fit.residual_model(1, 1, position=pos), back.residual_model(1, 1, position=pos)
        torch.testing.assert_close(a.cov, b.cov) and torch.testing.assert_close(a.mean, b.mean)
    with pytest.raises(ConfigError, match="no residual statistics of the bilinear rank-2"):
        fit.residual_model(0, 0, rank=2)


def test_residual_statistics_match_direct_computation(small_fit):
    """The fitted residual model is the mean / covariance of the row-centred rows s - p (and per query position)."""
    from attnlab.capture.run import stream_attention
    from attnlab.spectral.stats import row_centre

    m, w, fit = small_fit
    rows = []

    def sink(call):
        if call.layer == 1:
            px = fit.proxy(1, 0, "bilinear", 4, 0)
            s = call.scores()[:, 0].double() - px.scores(call.query[:, 0], call.key[:, 0], call.scaling).double()
            rows.append(row_centre(s, call.valid[:, 0]))

    stream_attention(m, w, sink, [1], 8, show_progress=False)
    x = torch.cat(rows).numpy()  # (M, N, N): every query row of the causal model has a key
    flat = x.reshape(-1, x.shape[-1])
    model = fit.residual_model(1, 0)
    np.testing.assert_allclose(model.mean.numpy(), flat.mean(0), atol=1e-6)  # float32 scores
    np.testing.assert_allclose(model.cov.numpy(), np.cov(flat.T), atol=1e-6)
    pos = fit.residual_model(1, 0, position=True)
    within = (x - x.mean(0)).reshape(-1, x.shape[-1])
    np.testing.assert_allclose(pos.mean.numpy(), x.mean(0), atol=1e-6)
    np.testing.assert_allclose(pos.cov.numpy(), within.T @ within / (len(flat) - x.shape[1]), atol=1e-6)


def test_small_model_evaluate_causal(small_fit):
    from attnlab.reconstruct.evaluate import Combo, evaluate, make_methods

    m, w, fit = small_fit
    combos = [Combo(e, s) for e in ("gaussian", "basis", "proxy", "proxy+gaussian") for s in ("local", "adaptive", "random")]
    res = evaluate(m, w[:4], make_methods(fit, combos, 1.0))  # full budget: exact
    for lab, r in res.items():
        assert r["mean"]["tv"] < 1e-6, lab
    extra = [Combo("gaussian", "qr", position=True), Combo("proxy+gaussian", "adaptive", position=True)]
    res = evaluate(m, w[:4], make_methods(fit, combos + extra, 0.5))
    assert all(0 <= r["mean"]["tv"] < 1 for r in res.values())
    again = evaluate(m, w[:4], make_methods(fit, [Combo("proxy+gaussian", "adaptive")], 0.5))  # deterministic
    assert again["proxy+gaussian/adaptive[r=4]"]["per_head"] == res["proxy+gaussian/adaptive[r=4]"]["per_head"]
    with pytest.raises(ConfigError, match="no residual statistics"):
        make_methods(fit, [Combo("proxy+gaussian", "adaptive")], 0.5, proxy_rank=3)


def _tiny_hf(tmp_path, kind: str):
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM, GPT2Config, GPT2LMHeadModel

    from attnlab.capture.hf import load_model, resolve_model_path

    tok = AutoTokenizer.from_pretrained(resolve_model_path("minilm"))
    torch.manual_seed(0)
    if kind == "bert":
        cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=32)
        model, head = BertForMaskedLM(cfg), "masked-lm"
    else:
        cfg = GPT2Config(vocab_size=tok.vocab_size, n_embd=32, n_layer=2, n_head=2, n_positions=32)
        model, head = GPT2LMHeadModel(cfg), "causal-lm"
    path = tmp_path / kind
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return load_model(str(path), head=head)


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_dropin_full_budget_unchanged_and_lm_loss(tmp_path, kind):
    from attnlab.capture.hf import run_forward
    from attnlab.reconstruct.approx import approximate, output_effect
    from attnlab.reconstruct.evaluate import Combo, make_methods
    from attnlab.reconstruct.fit import fit_from_windows

    hf = _tiny_hf(tmp_path, kind)
    g = torch.Generator().manual_seed(0)
    w = torch.randint(1000, 5000, (6, 16), generator=g)
    fit = fit_from_windows(hf, w, model_name=kind)
    ref = run_forward(hf, w[:2], output_hidden_states=True).hidden_states[-1]
    for combo in (Combo("gaussian", "adaptive"), Combo("basis", "local"), Combo("proxy", "random")):
        m = make_methods(fit, [combo], 1.0)[0]
        with approximate(hf, m):
            got = run_forward(hf, w[:2], output_hidden_states=True).hidden_states[-1]
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)
    eff = output_effect(hf, w[:4], make_methods(fit, [Combo("gaussian", "adaptive")], 0.5)[0], batch_size=2)
    assert "loss_exact" in eff and np.isfinite(eff["loss_approx"]) and 0 < eff["hidden_cosine"] <= 1 + 1e-6


def test_minilm_heldout_small():
    from attnlab.capture.hf import load_model, run_forward
    from attnlab.reconstruct.approx import approximate
    from attnlab.reconstruct.evaluate import Combo, evaluate, make_methods
    from attnlab.reconstruct.fit import fit_corpus, windows_for

    hf = load_model("minilm")
    fit = fit_corpus(hf, n_sequences=8, seq_len=64, layers=[0, 1])
    w = windows_for(hf.tokenizer, 64, 2, "heldout", seed=1)
    res = evaluate(hf, w, make_methods(fit, [Combo("proxy", "adaptive"), Combo("none", "random")], 0.25), layers=[0, 1])
    assert res["proxy/adaptive[r=4]"]["mean"]["tv"] < res["none/random"]["mean"]["tv"]
    ref = run_forward(hf, w).last_hidden_state
    with approximate(hf, make_methods(fit, [Combo("gaussian", "adaptive")], 1.0)[0]):
        got = run_forward(hf, w).last_hidden_state
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)


def test_train_smoke():
    from attnlab.reconstruct.train import train_compare

    res = train_compare(budgets=[0.5], selections=["adaptive"], steps=3, seq_len=16, d_model=16, n_heads=2,
                        n_layers=1, batch_size=4, refresh=2, refit_windows=8, eval_windows=4, max_chars=20_000,
                        log_every=1, progress=False)
    assert len(res["runs"]) == 2 and all(np.isfinite(r["heldout_loss"]) for r in res["runs"])


def test_cli_help():
    from typer.testing import CliRunner

    from attnlab.reconstruct.cli import app

    for cmd in ("run", "train", "fit"):
        r = CliRunner().invoke(app, [cmd, "--help"])
        assert r.exit_code == 0 and "--" in r.output


def test_dropin_head_subset_keeps_other_heads_exact(tmp_path):
    """--heads 0 (a subset): the drop-in reconstructs head 0 only, head 1 keeps exact attention, and the result
    names both (it used to fail: no statistics for head 1)."""
    from attnlab.capture.hf import run_forward
    from attnlab.reconstruct.approx import ApproxAttention, output_effect
    from attnlab.reconstruct.evaluate import Combo, make_methods
    from attnlab.reconstruct.fit import fit_from_windows
    from attnlab.sources.hf import attention_hooks

    hf = _tiny_hf(tmp_path, "bert")
    w = torch.randint(1000, 5000, (6, 16), generator=torch.Generator().manual_seed(0))
    fit = fit_from_windows(hf, w, heads=[0], model_name="bert")
    m = make_methods(fit, [Combo("gaussian", "random")], 0.25)[0]
    diff = []

    def spy(call):  # the handler's output against exact attention, per head
        out = ApproxAttention(m, [0])(call)
        exact = torch.nan_to_num(torch.softmax(call.scores().double(), -1), nan=0.0).to(call.value.dtype) @ call.value
        diff.append((out - exact).abs().amax(dim=(0, 2, 3)))
        return out

    with attention_hooks(hf, spy, [0]):
        run_forward(hf, w[:2])
    assert diff and float(diff[0][1]) == 0.0 and float(diff[0][0]) > 1e-4
    eff = output_effect(hf, w[:4], m, batch_size=2)  # default: the fitted heads
    assert eff["heads"] == [0] and eff["exact_heads"] == [1] and 0 < eff["hidden_cosine"] <= 1 + 1e-6
    full = output_effect(hf, w[:4], make_methods(fit_from_windows(hf, w, model_name="bert"),
                                                 [Combo("gaussian", "random")], 0.25)[0], batch_size=2)
    assert "exact_heads" not in full and "heads" not in full  # every head: the record is as before


@pytest.mark.slow
def test_train_resume_matches_uninterrupted(tmp_path, monkeypatch, one_thread):
    """`reconstruct train --resume`: interrupted after its second training run (seed 0 done), it keeps those runs,
    trains seed 1 and ends with the same results as an uninterrupted run; other settings are refused."""
    import json

    import attnlab.reconstruct.train as rtrain
    from attnlab.errors import ResultsError
    from attnlab.io import RunDir
    from attnlab.reconstruct.run import train as run_train

    kw = dict(budgets=[0.5], selections=["random"], seeds=[0, 1], steps=1, seq_len=16, d_model=16, n_heads=2,
              n_layers=1, batch_size=4, refresh=2, refit_windows=8, eval_windows=4, max_chars=20_000, log_every=1,
              progress=False)
    ref = run_train(tmp_path / "ref", **kw)
    calls = []

    def stop():
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(rtrain, "checkpoint_written", stop)
    with pytest.raises(KeyboardInterrupt):
        run_train(tmp_path / "cut", **kw)
    part = tmp_path / "cut" / rtrain.PARTIAL
    assert len(json.loads(part.read_text())["runs"]) == 2
    with pytest.raises(ResultsError, match="other settings"):
        run_train(tmp_path / "cut", resume=True, **{**kw, "steps": 2})
    trained = []
    real_one = rtrain.train_one
    monkeypatch.setattr(rtrain, "train_one", lambda *a, **k: trained.append(k["seed"]) or real_one(*a, **k))
    res = run_train(tmp_path / "cut", resume=True, **kw)
    assert trained == [1, 1]  # seed 0's runs were kept, not retrained
    strip = lambda runs: [{k: v for k, v in r.items() if k != "seconds"} for r in runs]  # noqa: E731
    assert strip(res["runs"]) == strip(ref["runs"]) and res["summary"] == ref["summary"]
    assert not part.exists() and RunDir(tmp_path / "cut", create=False).section("reconstruct")["train"]["runs"]


def test_train_resume_keeps_finished_runs_fast(tmp_path, monkeypatch):
    """The resume logic with a stub trainer (the real training: the slow test above): an interrupted comparison
    keeps its finished runs, trains only the rest in the same order, and ends equal to an uninterrupted one."""
    import attnlab.reconstruct.train as rtrain
    from attnlab.errors import ResultsError

    monkeypatch.setattr(rtrain, "char_windows", lambda n, split, m: torch.zeros(40, n, dtype=torch.long))
    trained = []

    def fake_one(cfg, train, held, combo, budget=None, objective="clm", seed=0, heldout_labels=None):
        lab = "full" if combo is None else combo.label
        trained.append((seed, lab))
        loss = 1.0 + seed / 10 + (0.0 if combo is None else float(budget))
        return {"label": lab, "budget": budget, "objective": objective, "seed": seed, "budget_pairs": None,
                "curve": [], "heldout_curve": [{"step": 1, "heldout_loss": loss}], "heldout_loss": loss,
                "heldout_loss_exact_attention": loss, "seconds": 0.0}

    monkeypatch.setattr(rtrain, "train_one", fake_one)
    kw = dict(budgets=[0.25, 0.5], selections=["random"], seeds=[0, 1, 2], seq_len=16, progress=False)
    ref = rtrain.train_compare(**kw)
    assert len(trained) == 9
    part = tmp_path / rtrain.PARTIAL
    calls = []

    def stop():
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt

    monkeypatch.setattr(rtrain, "checkpoint_written", stop)
    trained.clear()
    with pytest.raises(KeyboardInterrupt):
        rtrain.train_compare(checkpoint=part, **kw)
    monkeypatch.setattr(rtrain, "checkpoint_written", lambda: None)
    with pytest.raises(ResultsError, match="other settings"):
        rtrain.train_compare(checkpoint=part, resume=True, **{**kw, "seeds": [0, 1]})
    trained.clear()
    res = rtrain.train_compare(checkpoint=part, resume=True, **kw)
    assert trained == [(1, "gaussian/random")] * 2 + [(2, "full")] + [(2, "gaussian/random")] * 2
    assert res["runs"] == ref["runs"] and res["summary"] == ref["summary"]
    trained.clear()
    rtrain.train_compare(checkpoint=part, **kw)  # without --resume: starts over
    assert len(trained) == 9


@pytest.mark.slow
def test_run_with_head_subset_reaches_the_dropin(tmp_path):
    """`reconstruct run --heads 0-1` end to end: it failed at the drop-in (no statistics for head 2)."""
    from attnlab.reconstruct.run import reconstruct

    res = reconstruct(tmp_path / "r", seq_len=32, n_fit=8, n_eval=4, layers=[0], heads=[0, 1], budgets=[],
                      estimators=["gaussian"], selections=["random", "oracle"], position=False, progress=False)
    d = res["dropin"][0]
    assert d["heads"] == [0, 1] and d["exact_heads"] == list(range(2, 12)) and 0 < d["hidden_cosine"] <= 1 + 1e-6
