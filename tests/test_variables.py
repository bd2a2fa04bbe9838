"""Tests for attnlab.variables: task generators, training, m*(T) search and resume, law fits, CLI."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from attnlab.errors import ConfigError, ResultsError
from attnlab.io import RunDir, read_json
from attnlab.variables.complexity import SearchConfig, TrialStore, sample_complexity, sweep
from attnlab.variables.fit import fit_laws
from attnlab.variables.tasks import CLS_ID, make_task
from attnlab.variables.train import NormControl, TrainConfig, model_norms, train_model



pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one torch thread (conftest)


# ---------------------------------------------------------------- generators


@pytest.mark.parametrize("name,expected", [
    ("parity", lambda b: sum(b) % 2),
    ("and", lambda b: int(all(b))),
    ("or", lambda b: int(any(b))),
    ("majority", lambda b: int(sum(b) >= 2)),
])
def test_labels_on_hand_made_inputs(name, expected):
    task = make_task(name, T=10, s=3, seed=4)
    for pattern in itertools.product((0, 1), repeat=3):
        x = np.zeros((1, 10), dtype=np.int64)
        x[0, list(task.relevant)] = pattern
        x[0, [i for i in range(10) if i not in task.relevant]] = 1 - pattern[0]  # irrelevant bits must not matter
        assert task.label(x)[0] == expected(pattern), (name, pattern)
        pm = 2 * x - 1  # +/-1 encoding gives the same label
        assert task.label(pm)[0] == expected(pattern)


def test_hand_made_parity_with_known_positions():
    task = make_task("parity", T=6, s=2, seed=0)
    i, j = task.relevant
    x = np.zeros((3, 6), dtype=np.int64)
    x[1, i] = 1
    x[2, [i, j]] = 1
    assert task.label(x).tolist() == [0, 1, 0]


def test_samples_consistent_with_labels_and_format():
    task = make_task("random", T=20, s=4, seed=7)
    x, y = task.sample(500)
    assert x.shape == (500, 21) and x.dtype == torch.long
    assert (x[:, 0] == CLS_ID).all() and set(x[:, 1:].unique().tolist()) <= {0, 1}
    assert torch.equal(torch.from_numpy(task.label(x)), y)
    assert len(set(task.table)) == 2  # random function is never constant


def test_parity_balanced_uniform_and_unbalanced_and():
    parity = make_task("parity", T=32, s=3, seed=1, balanced=False)
    _, y = parity.sample(8000)
    assert abs(y.float().mean().item() - 0.5) < 0.03
    and_uniform = make_task("and", T=32, s=3, seed=1, balanced=False)
    _, y = and_uniform.sample(8000)
    assert abs(y.float().mean().item() - 1 / 8) < 0.02
    and_bal = make_task("and", T=32, s=3, seed=1, balanced=True)
    x, y = and_bal.sample(8000)
    assert abs(y.float().mean().item() - 0.5) < 0.03
    assert torch.equal(torch.from_numpy(and_bal.label(x)), y)


def test_determinism_by_seed_and_prefix_property():
    a, b, c = (make_task("majority", T=50, s=5, seed=sd) for sd in (3, 3, 4))
    assert a == b and a.relevant != c.relevant
    sa, sb = a.split(64, 100), b.split(64, 100)
    assert torch.equal(sa.train_x, sb.train_x) and torch.equal(sa.test_y, sb.test_y)
    assert not torch.equal(sa.train_x, c.split(64, 100).train_x)
    big = a.split(128, 100)
    assert torch.equal(big.train_x[:64], sa.train_x) and torch.equal(big.train_y[:64], sa.train_y)
    assert not torch.equal(sa.train_x[:50], sa.test_x[:50])  # separate streams


def test_label_noise_only_on_train():
    task = make_task("parity", T=16, s=2, seed=0, noise=0.2)
    sp = task.split(4000, 1000)
    flipped = (torch.from_numpy(task.label(sp.train_x)) != sp.train_y).float().mean().item()
    assert 0.17 < flipped < 0.23
    assert torch.equal(torch.from_numpy(task.label(sp.test_x)), sp.test_y)


@pytest.mark.parametrize("kwargs,flag", [
    (dict(name="and", T=4, s=5), "--s (5) must be <= --T (4)"),
    (dict(name="and", T=0, s=1), "--T"),
    (dict(name="and", T=8, s=0), "--s"),
    (dict(name="xor3", T=8, s=2), "--task"),
    (dict(name="majority", T=8, s=2), "--s"),
    (dict(name="and", T=8, s=2, noise=0.5), "--noise"),
])
def test_bad_task_inputs(kwargs, flag):
    with pytest.raises(ConfigError, match=flag.replace("(", r"\(").replace(")", r"\)")):
        make_task(**kwargs)


def test_bad_split_sizes():
    task = make_task("and", T=8, s=2)
    with pytest.raises(ConfigError, match="--m"):
        task.split(0, 10)
    with pytest.raises(ConfigError, match="--n-test"):
        task.split(10, 0)


# ---------------------------------------------------------------- training


def test_tiny_model_learns_sparse_and_t16():
    task = make_task("and", T=16, s=3, seed=0)
    cfg = TrainConfig(d_model=32, n_heads=2, max_steps=600, n_test=500, n_val=500, eval_every=25)
    r = train_model(task, 256, cfg, device="cpu")
    assert r.test_acc >= 0.95, r
    assert r.history and "qk_max" in r.history[0]


def test_constrain_keeps_norms_within_bounds():
    task = make_task("and", T=8, s=2, seed=0)
    norm = NormControl(mode="constrain", qk_bound=0.05, v_bound=0.3, out_bound=0.2)
    r = train_model(task, 64, TrainConfig(d_model=16, max_steps=60, eval_every=20, n_test=64, n_val=64, norm=norm))
    n = model_norms(r.model)
    assert max(max(row) for row in n["qk"]) <= 0.05 + 1e-5
    assert max(n["v"]) <= 0.3 + 1e-5 and n["out"] <= 0.2 + 1e-5
    free = train_model(task, 64, TrainConfig(d_model=16, max_steps=60, eval_every=20, n_test=64, n_val=64, lr=1e-2))
    assert model_norms(free.model)["out"] > 0.2  # the bound is active, not vacuous


def test_penalty_lowers_norms():
    task = make_task("and", T=8, s=2, seed=0)
    base = TrainConfig(d_model=16, max_steps=80, eval_every=80, n_test=64, n_val=64, lr=1e-2, stop_acc=1.0, patience=99)
    pen = TrainConfig(**{**base.to_dict(), "norm": NormControl(mode="penalty", penalty=0.5)})
    n0 = model_norms(train_model(task, 64, base).model)
    n1 = model_norms(train_model(task, 64, pen).model)
    assert n1["out"] < n0["out"] and n1["v"][0] < n0["v"][0]


def test_bad_train_inputs():
    with pytest.raises(ConfigError, match="--norm-mode"):
        NormControl(mode="clip")
    with pytest.raises(ConfigError, match="--qk-bound"):
        NormControl(mode="constrain", qk_bound=-1.0)
    with pytest.raises(ConfigError, match="--lr"):
        TrainConfig(lr=0)
    with pytest.raises(ConfigError, match="--device"):
        train_model(make_task("and", 8, 2), 8, device="tpu")


# ---------------------------------------------------------------- search


def threshold_learner(m_true: dict[int, int], calls: list | None = None, fail_seed: int | None = None):
    """Fake learner: accuracy 1 iff m >= m_true[T] (+ seed offset), recording calls."""

    def learn(T: int, m: int, seed: int) -> float:
        if calls is not None:
            calls.append((T, m, seed))
        shift = 1000 if seed == fail_seed else 0
        return 1.0 if m >= m_true[T] + shift else 0.5

    return learn


@pytest.mark.parametrize("m_true", [1, 7, 8, 100, 1000, 4097])
def test_search_finds_exact_threshold(m_true):
    res = sample_complexity(threshold_learner({32: m_true}), 32, [0, 1, 2], SearchConfig(m_min=1, rtol=0.0))
    assert res.m_star == m_true and res.lower == m_true - 1
    assert res.per_seed == {0: m_true, 1: m_true, 2: m_true}


def test_search_within_tolerance_median_and_flag():
    cfg = SearchConfig(m_min=8, rtol=0.1)
    res = sample_complexity(threshold_learner({64: 300}), 64, [0, 1, 2], cfg)
    assert res.lower < 300 <= res.m_star and res.m_star - res.lower <= 0.1 * res.m_star
    # one seed needs 1000 more samples: the median ignores it, and the disagreement is flagged
    res = sample_complexity(threshold_learner({64: 300}, fail_seed=2), 64, [0, 1, 2], SearchConfig(m_min=8, rtol=0.0))
    assert res.m_star == 300 and res.per_seed == {0: 300, 1: 300, 2: 1300}
    assert res.flag and "disagree" in res.flag
    assert res.ci[0] == 300 and res.ci[1] == 1300


def test_search_batched_learner_gets_rounds():
    calls = []

    def learn(T, pairs):
        calls.append(list(pairs))
        return [1.0 if m >= 100 + 10 * sd else 0.0 for m, sd in pairs]

    learn.batched = True
    res = sample_complexity(learn, 32, [0, 1, 2, 3, 4], SearchConfig(m_min=8, rtol=0.0))
    assert res.per_seed == {s: 100 + 10 * s for s in range(5)} and res.m_star == 120
    assert len(calls) < 12  # rounds, not one call per trial
    assert {sd for m, sd in calls[0]} == set(range(5))


def test_median_ci_with_unlearned_seeds():
    from attnlab.variables.complexity import median_ci

    med, ci = median_ci([10, 12, None, 14, 11])
    assert med == 12 and ci[0] <= 12 and ci[1] is None  # a resample may draw mostly unlearned seeds
    med, _ = median_ci([None, None, 5])
    assert med is None


def test_search_not_reached():
    res = sample_complexity(threshold_learner({16: 10**6}), 16, [0], SearchConfig(m_min=8, m_max=100))
    assert res.m_star is None and res.lower == 100


def test_resume_after_interruption(tmp_path):
    m_true = {16: 40, 32: 55, 64: 70}
    cfg = SearchConfig(m_min=4, rtol=0.0)
    reference = sweep(threshold_learner(m_true), [16, 32, 64], [0, 1], cfg)

    first: list = []
    inner = threshold_learner(m_true, first)

    def crashing(T, m, seed):
        if len(first) == 17:
            raise KeyboardInterrupt("simulated interruption")
        return inner(T, m, seed)

    path = tmp_path / "trials.json"
    with pytest.raises(KeyboardInterrupt):
        sweep(crashing, [16, 32, 64], [0, 1], cfg, TrialStore(path, {"task": "fake"}))
    saved = read_json(path)["trials"]
    assert len(saved) == len(first) == 17  # every finished trial was written as it arrived

    second: list = []
    resumed = sweep(threshold_learner(m_true, second), [16, 32, 64], [0, 1], cfg,
                    TrialStore(path, {"task": "fake"}, resume=True))
    done_first = set(first)
    assert not done_first & set(second)  # no finished trial repeated
    assert len(set(second)) == len(second)
    assert [r.m_star for r in resumed] == [r.m_star for r in reference] == [40, 55, 70]
    with pytest.raises(ResultsError, match="settings differ"):
        TrialStore(path, {"task": "other"}, resume=True)


@pytest.mark.parametrize("kw,flag", [
    (dict(threshold=0.0), "--threshold"), (dict(threshold=1.5), "--threshold"), (dict(points=0), "--points"),
    (dict(m_min=0), "--m-min"), (dict(m_min=10, m_max=5), "--m-max"), (dict(rtol=1.0), "--rtol"),
])
def test_bad_search_config(kw, flag):
    with pytest.raises(ConfigError, match=flag):
        SearchConfig(**kw)


def test_threshold_one_is_allowed():
    assert SearchConfig(threshold=1.0).threshold == 1.0


# ---------------------------------------------------------------- fits


def test_fit_picks_log_for_log_data():
    rng = np.random.default_rng(0)
    T = np.array([16, 32, 64, 128, 256, 512, 1024], dtype=float)
    m = 20 + 30 * np.log(T) + rng.normal(0, 2, len(T))
    rep = fit_laws(T, m)
    assert rep.best == "log" and rep.log.params["b"] == pytest.approx(30, rel=0.1)


def test_fit_picks_power_for_power_data():
    rng = np.random.default_rng(1)
    T = np.array([16, 32, 64, 128, 256, 512, 1024], dtype=float)
    m = 10 + 3 * T**0.7 + rng.normal(0, 2, len(T))
    rep = fit_laws(T, m)
    assert rep.best == "power" and rep.power.params["c"] == pytest.approx(0.7, abs=0.1)
    assert rep.delta_aic > 2


def test_fit_too_few_points():
    with pytest.raises(ConfigError, match="at least 5"):
        fit_laws([16, 32, 64, 128], [10, 12, 14, 16])
    with pytest.raises(ConfigError, match="at least 5"):
        fit_laws([16, 32, 64, 128, 256], [10, 12, 14, 16, float("nan")])


T9 = np.array([16, 32, 64, 128, 256, 512, 1024, 2048, 4096], dtype=float)


def test_fit_verdicts_log_power_inconclusive():
    rng = np.random.default_rng(3)
    clean = fit_laws(T9, 20 + 30 * np.log(T9) + rng.normal(0, 1, len(T9)))
    assert clean.verdict == "log" and clean.log.ci["b"][0] > 0 and clean.power.ci["c"][1] < 0.25
    noisy = fit_laws(T9, 60 + rng.normal(0, 25, len(T9)))
    assert noisy.verdict == "inconclusive"
    poly = fit_laws(T9, 5 * T9 * np.exp(rng.normal(0, 0.1, len(T9))))
    assert poly.verdict == "power" and poly.power.ci["c"][0] > 0.8
    assert clean.log.ci["a"][0] < clean.log.params["a"] < clean.log.ci["a"][1]


def test_fit_bootstrap_over_seeds():
    rng = np.random.default_rng(4)
    per_seed = [[float(np.round(20 + 30 * np.log(t) * np.exp(rng.normal(0, 0.02)))) for _ in range(5)] for t in T9]
    rep = fit_laws(T9, [np.median(p) for p in per_seed], per_seed=per_seed, n_boot=300)
    assert rep.method == "bootstrap" and rep.verdict == "log"
    assert 0.9 < rep.log.ci["r2"][0] <= rep.log.r2 <= rep.log.ci["r2"][1] + 1e-9
    wild = [[float(rng.choice([20, 2000])) for _ in range(5)] for _ in T9]  # seeds disagree wildly
    rep = fit_laws(T9, [np.median(p) for p in wild], per_seed=wild, n_boot=300)
    assert rep.verdict == "inconclusive"


# ---------------------------------------------------------------- end to end (fake learner) + CLI


def test_run_sweep_with_fake_learner_writes_section_plots_and_report(tmp_path):
    from attnlab.variables.experiment import SweepConfig, run_sweep
    from attnlab.variables.report import render_section

    m_true = {16: 40, 32: 46, 64: 52, 128: 58, 256: 64, 512: 10**6}
    linear = {T: 4 * T for T in m_true}
    cfg = SweepConfig(task="and", s=3, Ts=list(m_true), seeds=2, probe=False,
                      search=SearchConfig(m_min=4, m_max=4096, rtol=0.0))
    sec = run_sweep(cfg, tmp_path, learner=threshold_learner(m_true), log=lambda s: None,
                    contrast_learner=threshold_learner(linear))
    assert [r["m_star"] for r in sec["results"]] == [40, 46, 52, 58, 64, None]
    assert sec["not_learned"] == [{"T": 512, "m_max": 4096}]  # reported, not fitted
    assert sec["fits"]["n_points"] == 5 and sec["fits"]["verdict"] == "log"
    assert [r["m_star"] for r in sec["contrast"]["results"]] == [4 * T for T in m_true]
    assert sec["contrast"]["fits"]["verdict"] == "power"
    assert sec["contrast"]["fits"]["power"]["ci"]["c"][0] > 0.9
    run = RunDir(tmp_path)
    assert run.section("variables")["results"][0]["T"] == 16
    assert run.file("variables_mstar.png").stat().st_size > 1000
    html = render_section(run)
    assert '<img src="variables_mstar.png"' in html and "<td>40</td>" in html  # embedded by the report
    assert "not learned up to m = 4096" in html and "Verdict: <b>log</b>" in html


def test_probe_reports_mass_on_relevant():
    from attnlab.variables.probe import attention_probe

    task = make_task("and", T=16, s=3, seed=0)
    r = train_model(task, 32, TrainConfig(d_model=16, max_steps=5, eval_every=5, n_test=32, n_val=32))
    p = attention_probe(r.model, task, n=64)
    mass = np.array(p["mass"])
    assert mass.shape == (1, 2) and ((0 <= mass) & (mass <= 1)).all()
    assert np.allclose(p["support_recall"], 1.0)  # softmax support is everything
    assert np.allclose(p["support_precision"], 3 / 17, atol=1e-6)


def test_cli_parses_t_lists_and_reports_bad_flags(tmp_path):
    from typer.testing import CliRunner

    from attnlab.variables.cli import app, parse_ints

    assert parse_ints(["16,32", "64"], ["128"]) == [16, 32, 64, 128]
    runner = CliRunner()
    res = runner.invoke(app, ["sweep", "--s", "5", "--T", "4", "--out", str(tmp_path)])
    assert res.exit_code == 2 and "--s (5) must be <= --T (4)" in res.output
    res = runner.invoke(app, ["sweep", "--threshold", "1.5", "--out", str(tmp_path)])
    assert res.exit_code == 2 and "--threshold" in res.output
    for flag in ("--qk-bound", "--v-bound", "--out-bound", "--emb-bound"):
        res = runner.invoke(app, ["sweep", flag, "0", "--out", str(tmp_path)])
        assert res.exit_code == 2 and flag in res.output and "> 0" in res.output
    res = runner.invoke(app, ["sweep", "--norm-sweep", "4,-1", "--out", str(tmp_path)])
    assert res.exit_code == 2 and "--norm-sweep" in res.output
    res = runner.invoke(app, ["sweep", "--model", "mlp", "--out", str(tmp_path)])
    assert res.exit_code == 2 and "--model" in res.output



def test_command_options_default_to_the_library_defaults():
    """The options' defaults (written once in SweepOptions / TrainOptions) build the library's default configs."""
    from dataclasses import asdict

    from attnlab.variables.config import SweepConfig, SweepOptions, TrainOptions

    assert asdict(SweepOptions().config()) == {**asdict(SweepConfig()), "fit_acc": 1.0}
    assert TrainOptions().config() == TrainConfig()


def test_sweep_options_reach_every_learner_they_apply_to(tmp_path, monkeypatch):
    """--d-model sizes the bounded head and the transformer (not the MLP); the norm bounds reach the transformer
    only with --norm-mode constrain; bare integers after the options join --T."""
    from typer.testing import CliRunner

    import attnlab.variables.experiment as experiment
    from attnlab.variables.cli import app

    seen = []
    monkeypatch.setattr(experiment, "run_sweep", lambda cfg, out, **kw: seen.append((cfg, kw)) or {"results": []})
    monkeypatch.setattr("attnlab.variables.cli.write_report", lambda out: None)
    base = ["sweep", "--s", "2", "--d-model", "16", "--qk-bound", "8", "--max-steps", "7", "--out", str(tmp_path)]
    for extra in (["--T", "4,6", "--norm-mode", "constrain", "--device", "cpu", "8"], ["--T", "4"]):
        res = CliRunner().invoke(app, [*base, *extra])
        assert res.exit_code == 0, res.output
    (on, kw), (off, _) = seen
    assert on.Ts == [4, 6, 8] and off.Ts == [4] and kw["device"] == "cpu"
    assert on.bounded.d_model == on.train.d_model == 16 and on.mlp.width == 128 and on.mlp.max_steps == 7
    assert on.bounded.bounds.qk == on.train.norm.qk_bound == 8.0 and on.train.norm.v_bound == 4.0
    assert off.bounded.bounds.qk == 8.0 and off.train.norm.qk_bound is None


# ---------------------------------------------------------------- bounded-norm ensemble and the MLP contrast


def _members(T, s, ms, seeds=(0,)):
    from attnlab.variables.ensemble import Member

    return [Member(make_task("and", T, s, sd), m, sd) for sd in seeds for m in ms]


def test_projection_keeps_every_norm_within_its_bound():
    from attnlab.variables.ensemble import Bounds, EnsembleConfig, train_ensemble

    b = Bounds(emb=0.5, qk=0.7, v=0.3, out=0.2)
    cfg = EnsembleConfig(kind="bounded", max_steps=40, eval_every=10, n_test=64, lr=0.05, bounds=b, stop_loss=0.0)
    recs, model, _ = train_ensemble(_members(8, 2, [16, 32], seeds=(0, 1)), cfg, return_model=True)
    n = model.norms()
    for key, bound in (("emb", b.emb), ("qk", b.qk), ("v", b.v), ("out", b.out)):
        assert float(n[key].max()) <= bound * (1 + 1e-5), key
    assert all(r["norm_qk"] <= b.qk * (1 + 1e-5) for r in recs)
    free = EnsembleConfig(kind="bounded", max_steps=40, eval_every=10, n_test=64, lr=0.05, bounds=None, stop_loss=0.0)
    _, fm, _ = train_ensemble(_members(8, 2, [16, 32], seeds=(0, 1)), free, return_model=True)
    fn = fm.norms()
    assert float(fn["emb"].max()) > b.emb and float(fn["out"].max()) > b.out  # the bounds are active, not vacuous
    # the projection itself: a far-out weight lands exactly on the bound
    with torch.no_grad():
        fm.wc.mul_(100.0)
    fm.project(b)
    assert float(fm.norms()["out"].max()) == pytest.approx(b.out, rel=1e-5)


def test_bounded_head_learns_and_contrast_mlp_trains():
    from attnlab.variables.ensemble import Bounds, EnsembleConfig, train_ensemble

    cfg = EnsembleConfig(kind="bounded", max_steps=300, eval_every=25, n_test=300, bounds=Bounds())
    recs = train_ensemble(_members(8, 2, [128], seeds=(0, 1)), cfg)
    assert min(r["accuracy"] for r in recs) >= 0.95, recs
    mlp = EnsembleConfig(kind="mlp", lr=0.05, max_steps=200, eval_every=25, n_test=300)
    small, big = train_ensemble(_members(8, 2, [8, 256]), mlp)
    assert big["accuracy"] >= 0.9 and big["train_acc"] == 1.0 and big["accuracy"] > small["accuracy"]


def test_ensemble_member_does_not_depend_on_its_companions():
    from attnlab.variables.ensemble import Bounds, EnsembleConfig, train_ensemble

    cfg = EnsembleConfig(kind="bounded", max_steps=30, eval_every=10, n_test=64, bounds=Bounds(), stop_loss=0.0)
    alone = train_ensemble(_members(8, 2, [32], seeds=(1,)), cfg)[0]
    crowd = train_ensemble(_members(8, 2, [16, 32], seeds=(0, 1)), cfg)
    assert crowd[3]["accuracy"] == alone["accuracy"]
    assert crowd[3]["train_loss"] == pytest.approx(alone["train_loss"], rel=1e-4, abs=1e-6)


def test_bad_bounds_and_sweep_config():
    from attnlab.variables.ensemble import Bounds
    from attnlab.variables.experiment import SweepConfig

    for kw, flag in ((dict(qk=0.0), "--qk-bound"), (dict(v=-1.0), "--v-bound"), (dict(out=float("inf")), "--out-bound"),
                     (dict(emb=0), "--emb-bound")):
        with pytest.raises(ConfigError, match=flag):
            Bounds(**kw)
    with pytest.raises(ConfigError, match="--norm-sweep"):
        SweepConfig(norm_sweep=[4.0, 0.0])
    with pytest.raises(ConfigError, match="--contrast"):
        SweepConfig(contrast="svm")
    with pytest.raises(ConfigError, match="--model"):
        SweepConfig(model="rnn")


def test_bounded_probe_shapes():
    from attnlab.variables.ensemble import Bounds, EnsembleConfig, bounded_probe, train_ensemble

    cfg = EnsembleConfig(kind="bounded", max_steps=200, eval_every=25, n_test=100, bounds=Bounds())
    mem = _members(16, 2, [128])
    _, model, chosen = train_ensemble(mem, cfg, return_model=True)
    p = bounded_probe(model, chosen[0], mem[0].task, n=64)
    assert len(p["mass"]) == 1 and len(p["mass"][0]) == 1 and 0 <= p["mass"][0][0] <= 1
    assert p["mass"][0][0] > 2 / 17  # learned: more than uniform attention on the relevant positions


# ---------------------------------------------------------------- optimisation vs generalisation (issue 30)


def test_search_ignores_trials_that_do_not_fit_and_reports_fit_rate():
    """m=64 does not fit for seed 0 and m=128..255 do not fit for seed 1: those trials neither succeed nor fail."""

    def learn(T, pairs):
        out = []
        for m, sd in pairs:
            fit = not ((sd == 0 and m == 64) or (sd == 1 and 128 <= m < 256))
            # an unfit trial reports a success that must not count (and a plain failure elsewhere below 100)
            out.append({"accuracy": 1.0 if (m >= 100 or not fit) else 0.5, "fit": fit, "attempts": 3 if not fit else 1})
        return out

    learn.batched = True
    res = sample_complexity(learn, 32, [0, 1], SearchConfig(m_min=8, m_max=4096, rtol=0.0))
    assert res.per_seed == {0: 100, 1: 100}  # without the exclusion seed 0 would stop at 64
    seed1 = [r for r in res.trials if r["seed"] == 1]
    assert len({r["m"] for r in seed1}) == len(seed1)  # an unfit size is never retried
    rates = {f["m"]: f for f in res.fit}
    assert rates[64] == {"m": 64, "n": 2, "fit": 1, "rate": 0.5}
    assert 0 < res.fit_rate < 1 and "did not fit" in res.flag
    assert res.restarts["restarted"] == sum(not r["fit"] for r in res.trials) and res.restarts["max_restarts"] == 2


def test_interior_skips_tried_sizes():
    from attnlab.variables.complexity import _interior

    assert _interior(10, 14, 4, frozenset({12})) == [11, 13]
    pts = _interior(100, 200, 3, frozenset({119, 141, 168}))
    assert len(pts) == 3 and not set(pts) & {119, 141, 168} and all(100 < p < 200 for p in pts)


def test_ensemble_restarts_unfit_trials_and_records_train_fit():
    from attnlab.variables.ensemble import Bounds, EnsembleConfig, train_ensemble

    mem = _members(8, 2, [64], seeds=(0, 1))
    starved = EnsembleConfig(kind="bounded", max_steps=2, eval_every=1, n_test=64, bounds=Bounds(), restarts=2,
                             lr_grid=[1e-3, 3e-3])
    recs = train_ensemble(mem, starved)
    for r in recs:  # two steps cannot fit 64 examples: every restart was used, the best-loss attempt kept
        assert r["fit"] is False and r["attempts"] == 3 and r["restarts"] in (0, 1, 2)
        assert r["lr"] == [1e-3, 3e-3, 1e-3][r["restarts"]] and 0 < r["train_loss"] < 1 and r["train_acc"] < 1
    ok = EnsembleConfig(kind="bounded", max_steps=300, eval_every=25, n_test=64, bounds=Bounds(), restarts=2)
    recs, model, chosen = train_ensemble(mem, ok, return_model=True)
    assert all(r["fit"] and r["attempts"] == 1 and r["train_acc"] == 1.0 for r in recs), recs
    # the returned model holds the kept weights: its train accuracy is the recorded one
    from attnlab.variables.ensemble import _evaluate, _stack_data

    tx, ty, _, _, mt = _stack_data(mem, 64, torch.device("cpu"))
    acc, loss = _evaluate(model, tx, ty, mt, torch.tensor([64, 64]), 256)
    assert acc.tolist() == [1.0, 1.0] and loss.tolist() == pytest.approx([r["train_loss"] for r in recs], rel=1e-4, abs=1e-6)
    with pytest.raises(ConfigError, match="--fit-acc"):
        EnsembleConfig(fit_acc=0)
    with pytest.raises(ConfigError, match="--lr-grid"):
        EnsembleConfig(lr_grid=[0.01, -1])
    with pytest.raises(ConfigError, match="--restarts"):
        EnsembleConfig(restarts=-1)
