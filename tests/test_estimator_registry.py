"""Extension point of issue 23: an estimator registered from outside the package (one object with its cost, one
registration) runs through the held-out evaluation, the cost accounting and the name checks, and is gone again
once unregistered. Also the compatibility names of the old single-module estimators."""

from __future__ import annotations

import math

import pytest
import torch

from attnlab.errors import ConfigError
from attnlab.reconstruct.cost import cost_breakdown, method_cost
from attnlab.reconstruct.estimators import (ALL_ESTIMATORS, ESTIMATOR_REGISTRY, PROXY_ESTIMATORS, EstimatorKind,
                                            register_estimator)
from attnlab.reconstruct.evaluate import Combo, evaluate, make_methods


class MedianFill(EstimatorKind):
    """Toy: every unselected key gets the median of the row's observed scores (nothing fitted)."""

    name = "test-median"
    help = "median of the observed scores"

    def __init__(self):
        self.built: list[tuple[int, int]] = []

    def build(self, method, layer, head):
        self.built.append((layer, head))
        return self

    def _fill(self, scores, idx, valid, base):
        B, nq, n = scores.shape
        full = idx.expand(B, nq, -1) if idx.dim() < 3 else idx
        v = torch.ones_like(scores, dtype=torch.bool) if valid is None else valid.expand(B, nq, n)
        obs = torch.gather(scores - base, -1, full).masked_fill(~torch.gather(v, -1, full), float("nan"))
        est = base + obs.nanmedian(-1).values.nan_to_num(0.0).unsqueeze(-1)
        return est.scatter(-1, full, torch.gather(scores, -1, full)).masked_fill(~v, float("-inf"))

    def estimate(self, scores, idx, valid=None, row_mean=None, proxy=None):
        assert proxy is None  # only estimators tagged 'proxy' are given the proxy scores
        return self._fill(scores, idx, valid, torch.zeros_like(scores))

    def cost(self, s):
        return {"per_row": float(s.b + s.u), "setup": 0.0}  # linear-time median of b, then u fills


class ProxyMedian(MedianFill):
    """Toy reading the proxy: proxy plus the median observed difference to it."""

    name = "test-proxy-median"
    tags = ("proxy",)

    def estimate(self, scores, idx, valid=None, row_mean=None, proxy=None):
        assert proxy is not None and proxy.shape == scores.shape
        return self._fill(scores, idx, valid, proxy.to(scores.dtype))


@pytest.fixture
def toys():
    kinds = MedianFill(), ProxyMedian()
    for k in kinds:
        register_estimator(k)  # the one registration: nothing else in the package is edited
    yield kinds
    for k in kinds:
        ESTIMATOR_REGISTRY.remove(k.name)


@pytest.fixture(scope="module")
def tiny_fit():
    from attnlab.models import SmallTransformer, TransformerConfig
    from attnlab.reconstruct.fit import fit_from_windows

    torch.manual_seed(0)
    m = SmallTransformer(TransformerConfig(vocab_size=50, d_model=32, n_heads=2, n_layers=2, max_len=16, causal=True))
    w = torch.randint(0, 50, (12, 16))
    return m, w, fit_from_windows(m, w, model_name="small")


def test_registered_estimator_runs_through_evaluation(toys, tiny_fit):
    m, w, fit = tiny_fit
    combos = [Combo(t.name, s) for t in toys for s in ("random", "local")] + [Combo("none", "random")]
    full = evaluate(m, w[:2], make_methods(fit, combos, 1.0))  # full budget: every pair exact
    assert all(r["mean"]["tv"] < 1e-6 for r in full.values())
    res = evaluate(m, w[:2], make_methods(fit, combos, 0.25))
    assert {"test-median/random", "test-median/local", "test-proxy-median/random[r=4]"} <= set(res)
    for lab in ("test-median/local", "test-proxy-median/local[r=4]"):
        r = res[lab]
        assert r["estimator"] == lab.split("/")[0] and set(r["per_layer"]) == {"0", "1"}
        assert 0 < r["mean"]["tv"] < 1 and math.isfinite(r["mean"]["rel_err"])  # a fill, unlike 'none'
    assert math.isinf(res["none/random"]["mean"]["rel_err"])
    assert sorted(set(toys[0].built)) == [(l, h) for l in fit.layers for h in fit.heads]  # built per head, cached
    assert len(toys[0].built) == 2 * 2 * len(fit.layers) * len(fit.heads)  # 2 selections x 2 evaluations


def test_registered_estimator_is_costed(toys, tiny_fit):
    _, _, fit = tiny_fit
    n, d, b = 16, 16, 4
    c = cost_breakdown("test-median", "random", n, d, b)
    assert c["per_row_macs"] == {"exact_pairs": b * d, "proxy_scores": 0, "proxy_projections": 0,
                                 "row_mean": 2 * d, "selection": b, "estimator": b + (n - b)}
    meth = make_methods(fit, [Combo("test-median", "random")], b)[0]
    assert method_cost(meth) == c
    c = cost_breakdown("test-proxy-median", "local", n, d, b, r=2)  # the proxy tag: the rank-2 proxy is paid
    assert c["per_row_macs"]["proxy_scores"] == n * 2 and c["proxy_rank"] == 2
    with pytest.raises(ConfigError, match="--proxy-rank 0 must be in"):
        cost_breakdown("test-proxy-median", "local", n, d, b)


def test_names_come_from_the_registry(toys):
    from attnlab.reconstruct.cost import __getattr__ as cost_attr

    assert "test-median" in ALL_ESTIMATORS and list(PROXY_ESTIMATORS) == ["proxy", "proxy+gaussian", "test-proxy-median"]
    with pytest.raises(ConfigError, match="--estimators: unknown 'nope' .*test-median"):
        Combo("nope", "random").validate()
    with pytest.warns(DeprecationWarning, match="ESTIMATOR_COSTS"):
        costs = cost_attr("ESTIMATOR_COSTS")
    assert costs.names() == ESTIMATOR_REGISTRY.names()
    from attnlab.reconstruct.cost_shape import CostShape

    s = CostShape(16, 8, 4, k=2)
    assert costs.get("basis")(s) == ESTIMATOR_REGISTRY.get("basis").cost(s)


def test_unregistered_estimator_is_unknown_again():
    assert "test-median" not in ALL_ESTIMATORS
    with pytest.raises(ConfigError, match="--estimators: unknown 'test-median' \\(choose from gaussian, basis"):
        Combo("test-median", "random").validate()
    with pytest.raises(ConfigError, match="--estimators: unknown 'test-median'"):
        cost_breakdown("test-median", "random", 16, 16, 4)


def test_old_names_and_the_estimator_factory():
    from attnlab.reconstruct.estimators import (ESTIMATORS, BasisEstimator, Estimator, NoneEstimator, RowModel,
                                                check_k)

    assert tuple(ALL_ESTIMATORS) == ("gaussian", "basis", "none", "mean", "proxy", "proxy+gaussian")
    assert ESTIMATORS == ("gaussian", "basis", "none", "mean")
    model = RowModel(torch.zeros(6, dtype=torch.float64), torch.eye(6, dtype=torch.float64))
    est = Estimator("basis", model, k=2)
    assert isinstance(est, BasisEstimator) and isinstance(est, Estimator) and est.model.basis.shape == (6, 2)
    x = torch.randn(1, 6, 6, dtype=torch.float64)
    out = Estimator("none", model)(x, torch.tensor([1, 4]))
    assert isinstance(Estimator("none", model), NoneEstimator) and torch.isinf(out).sum() == 6 * 4
    with pytest.raises(ConfigError, match="--estimator must be one of gaussian, basis, none, mean \\(got 'proxy'\\)"):
        Estimator("proxy", model)
    with pytest.raises(ConfigError, match="--k 3 exceeds --budget 2"):
        check_k(3, 2)
    with pytest.raises(ConfigError, match="the 'none' estimator with no exact pairs computes nothing"):
        cost_breakdown("none", "none", 16, 16, 0)


class BasisMedian(MedianFill):
    """Toy with a basis size and residual statistics: the run's k check and fit plan read its tags, not its name."""

    name = "test-basis-residual"
    tags = ("basis", "residual", "proxy")


def test_registered_estimator_reaches_the_run_config_and_the_help():
    from typer.testing import CliRunner

    from attnlab.cli import app
    from attnlab.reconstruct.run import ReconstructConfig, combos_for, residual_proxies

    kind = BasisMedian()
    register_estimator(kind)
    try:
        cfg = ReconstructConfig(estimators=[kind.name], selections=["adaptive"], seq_len=16, budget=4, k=5,
                                extra_ranks=[8])
        with pytest.raises(ConfigError, match="--k 5 exceeds --budget 4"):  # tagged 'basis': k is checked
            cfg.validate()
        cfg.k = 4
        cfg.validate()
        assert residual_proxies(cfg) == [("bilinear", 4, 0), ("bilinear", 8, 0)]  # tagged 'residual'
        assert combos_for(cfg) == [Combo(kind.name, "adaptive")]
        res = CliRunner().invoke(app, ["reconstruct", "run", "--help"], terminal_width=400)
        assert res.exit_code == 0 and "test-basis-residual: median of the observed scores" in res.output
    finally:
        ESTIMATOR_REGISTRY.remove(kind.name)
    cfg = ReconstructConfig(estimators=["mean"], k=10**6)
    cfg.validate()  # no estimator with a basis: --k is not checked against the budget
    assert residual_proxies(cfg) == []
