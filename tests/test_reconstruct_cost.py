"""Total-compute accounting, the compute frontier and `reconstruct run --compute` (issue 14)."""

from __future__ import annotations

import json

import pytest
import torch

from attnlab.errors import ConfigError
from attnlab.reconstruct.cost import ITEMS, check_compute, cost_breakdown
from conftest import save_tiny_bert


def test_issue_example_minilm_proxy_gaussian_adaptive():
    """The issue's table: d_head 32, N 128, b 32, rank-8 proxy: pairs 25%, proxy 25%, projections 12.5%, mean 1.6%."""
    c = cost_breakdown("proxy+gaussian", "adaptive", n=128, d=32, b=32, r=8)
    f = c["fractions"]
    assert f["exact_pairs"] == 0.25 and f["proxy_scores"] == 0.25 and f["proxy_projections"] == 0.125
    assert f["row_mean"] == pytest.approx(1 / 64)
    assert f["selection"] == pytest.approx(128 / 4096)  # top-b of 128 proxy scores
    # per-row Gaussian on the residual: Cholesky b^3/6, 2 triangular solves (b^2), Sigma_RS w over 96 keys (b u),
    # fill (u), residual of the observed (b) and proxy added back (u)
    b, u = 32, 96
    assert c["per_row_macs"]["estimator"] == pytest.approx(b ** 3 / 6 + b * b + b * u + u + b + u)
    assert c["compute"] == pytest.approx(sum(c["per_row_macs"].values()) / 4096)
    assert c["compute"] > 1.0 and c["proxy_rank"] == 8 and not c["shared_gains"]


def test_explicit_counts_small_case():
    """n=8 keys, d=4, b=2 pairs, r=1: every item counted by hand."""
    n, d, b, r = 8, 4, 2, 1
    c = cost_breakdown("gaussian", "qr", n, d, b)  # shared gains: (r - m) G over the 6 unobserved keys + fill
    assert c["per_row_macs"] == {"exact_pairs": 8, "proxy_scores": 0, "proxy_projections": 0, "row_mean": 8,
                                 "selection": 0, "estimator": 2 * 6 + 6}
    assert c["compute"] == pytest.approx((8 + 8 + 18) / 32)
    assert c["setup_macs"] > 0  # the gain matrix, once per head, kept out of the per-row total
    c = cost_breakdown("gaussian", "random", n, d, b)  # per row: chol 8/6, 2 solves 4, product 12, fill 6, draws 2
    assert c["per_row_macs"]["estimator"] == pytest.approx(8 / 6 + 4 + 12 + 6)
    assert c["per_row_macs"]["selection"] == 2
    c = cost_breakdown("none", "adaptive", n, d, b, r)  # sparse attention on top-b from the proxy: no row mean
    assert c["per_row_macs"] == {"exact_pairs": 8, "proxy_scores": 8, "proxy_projections": 8, "row_mean": 0,
                                 "selection": 8, "estimator": 0}
    c = cost_breakdown("proxy", "none", n, d, 0, r)  # pure proxy: no exact pairs
    assert c["per_row_macs"] == {"exact_pairs": 0, "proxy_scores": 8, "proxy_projections": 8, "row_mean": 8,
                                 "selection": 0, "estimator": 16}
    c = cost_breakdown("basis", "leverage", n, d, b, k=1)  # shared pseudo-inverse (k+1) b, then U_R a over 6 keys
    assert c["per_row_macs"]["estimator"] == 2 * 2 + 2 * 6
    c = cost_breakdown("gaussian", "oracle", n, d, b)
    assert c["compute"] >= 1.0 and c["reference_only"] and c["per_row_macs"]["exact_pairs"] == 0
    assert set(c["per_row_macs"]) == set(ITEMS)


def test_exact_pair_count_matches_the_method(small_fit_cost):
    """The pairs a method really reads per row equal the b its cost counts (adaptive, random, local; b=0 proxy)."""
    from attnlab.capture.run import stream_attention
    from attnlab.reconstruct.cost import method_cost
    from attnlab.reconstruct.evaluate import Combo, Method

    m, w, fit = small_fit_cost
    for combo, b in ((Combo("proxy", "adaptive"), 5), (Combo("gaussian", "random"), 3), (Combo("gaussian", "local"), 4),
                     (Combo("proxy", "adaptive"), 0)):
        meth = Method(fit, combo, b, proxy_rank=2)
        seen = []

        def sink(call):
            if call.layer == 0:
                s = call.scores()[:, 0]
                idx = meth.selection(0, 0, call, s, call.valid[:, 0])
                seen.append(idx.expand(s.shape[0], s.shape[1], -1) if idx.dim() < 3 else idx)

        stream_attention(m, w[:4], sink, [0], 4, show_progress=False)
        idx = seen[0]
        assert idx.shape[-1] == b and all(len(set(row.tolist())) == b for row in idx.reshape(-1, max(b, 1))[:20]) or b == 0
        c = method_cost(meth)
        assert c["per_row_macs"]["exact_pairs"] == idx.shape[-1] * fit.meta["d_head"]
        assert c["proxy_rank"] == (2 if combo.selection == "adaptive" else None)


@pytest.fixture(scope="module")
def small_fit_cost():
    from attnlab.models import SmallTransformer, TransformerConfig
    from attnlab.reconstruct.fit import fit_from_windows

    torch.manual_seed(0)
    m = SmallTransformer(TransformerConfig(vocab_size=50, d_model=32, n_heads=2, n_layers=2, max_len=16, causal=True))
    w = torch.randint(0, 50, (16, 16))
    return m, w, fit_from_windows(m, w, model_name="small", residual_proxies=[("bilinear", r, 0) for r in (2, 4)])


def test_frontier_points_and_best_at(small_fit_cost):
    from attnlab.reconstruct.frontier import best_at, candidates, evaluate_points, frontier_curves, require_affordable

    m, w, fit = small_fit_cost
    pts, skipped = candidates(fit, ["proxy-only", "topb-none", "topb-proxy+gaussian", "gaussian-qr"],
                              fractions=(1 / 8, 1 / 2), ranks=(2, 4), max_compute=0.9)
    assert all(c["compute"] <= 0.9 for _, _, c in pts) and all(s["compute"] > 0.9 for s in skipped)
    assert any(m_.b == 0 for _, m_, _ in pts)  # the pure proxy is on the grid
    res = evaluate_points(m, w[:4], pts, chunks=2, batch_size=2)
    assert all(v["n_chunks"] == 2 and v["worst_layer_tv"]["std"] >= 0 for v in res.values())
    lab = best_at(res, 0.6)
    ok = [v["worst_layer_tv_pooled"] for v in res.values() if v["compute"] <= 0.6]
    assert res[lab]["compute"] <= 0.6 and res[lab]["worst_layer_tv_pooled"] == min(ok)
    curves = frontier_curves(res)
    for pts_ in curves.values():  # Pareto: compute up, TV down
        assert all(a["worst_layer_tv_pooled"] > b["worst_layer_tv_pooled"] for a, b in zip(pts_, pts_[1:]))
    with pytest.raises(ConfigError, match="the cheapest is .* at 0.0"):
        require_affordable(fit, 0.001)


@pytest.mark.parametrize("bad", [0, 0.0, -0.1, 1.5, float("nan")])
def test_compute_out_of_range(bad):
    with pytest.raises(ConfigError, match="--compute"):
        check_compute(bad)


def test_run_compute_selects_best_within_budget_and_bad_inputs(tmp_path):
    from typer.testing import CliRunner

    from attnlab.reconstruct.cli import app
    from attnlab.reconstruct.run import reconstruct

    model = save_tiny_bert(tmp_path / "tinybert", n_layers=1, masked_lm=False)
    kw = dict(seq_len=32, n_fit=4, n_eval=4, families=["proxy-only", "topb-proxy", "gaussian-qr"], budgets=[], estimators=["gaussian", "none", "proxy"],
              selections=["random", "adaptive"], position=False, pooled_baseline=False, dropin=False, extra_ranks=[],
              frontier_ranks=[2, 4], frontier_budgets=[1 / 8, 1 / 2], chunks=2, batch_size=2)
    res = reconstruct(tmp_path / "run", model=model, progress=False, compute=0.5, **kw)
    assert res["best_compute"] <= 0.5 and res["best_chosen_at"] == "total compute <= 0.5"
    pool = [max(x["tv"] for x in v["per_layer"].values()) for v in res["table"].values()
            if v["cost"]["compute"] <= 0.5 and v["selection"] != "oracle"]
    pool += [v["worst_layer_tv_pooled"] for v in res["frontier_points"].values() if v["compute"] <= 0.5]
    assert res["best_worst_layer_tv"] == min(pool)
    # the proxy share is the winning method's own rank, not the base --proxy-rank
    assert res["proxy_cost_fraction"] == (res["best_cost"]["proxy_rank"] or 0) / 16
    saved = json.loads((tmp_path / "run" / "results.json").read_text())["reconstruct"]
    assert all("cost" in v for v in saved["table"].values())
    with pytest.raises(ConfigError, match="no method fits .* the cheapest is"):
        reconstruct(tmp_path / "run2", model=model, progress=False, compute=0.001, **kw)
    r = CliRunner().invoke(app, ["run", "--model", model, "--compute", "1.5", "--out", str(tmp_path / "r3")])
    assert r.exit_code == 2 and "--compute" in r.output and "(0, 1]" in r.output


def test_training_summary_pairs_gaps_by_seed_and_cli_bad_seed():
    """The gap table pairs each run with full attention of the same seed; the verdict needs the t-interval to
    exclude 0; a non-integer --seeds is one clear line and exit 2."""
    from typer.testing import CliRunner

    from attnlab.reconstruct.cli import app
    from attnlab.reconstruct.train import format_summary, summarise_runs

    def run(label, seed, loss, budget=None):
        return {"label": label, "objective": "clm", "seed": seed, "budget": budget, "heldout_loss": loss,
                "heldout_loss_exact_attention": loss, "heldout_curve": [{"step": 1, "heldout_loss": loss}],
                "compute": 1.0 if budget is None else 0.4}

    runs = [run("full", s, 2.0 + 0.1 * s) for s in range(3)]
    runs += [run("proxy/adaptive", s, 2.0 + 0.1 * s + 0.05 + 0.001 * s, 0.25) for s in range(3)]  # +0.05, tiny sd
    runs += [run("none/adaptive", s, 2.0 + 0.1 * s + (0.05 if s else -0.05), 0.125) for s in range(3)]
    summ = {r["label"]: r for r in summarise_runs(runs)}
    gap = summ["proxy/adaptive"]["gap_to_full"]
    assert gap["mean"] == pytest.approx(0.051) and gap["std"] == pytest.approx(0.001)
    assert summ["proxy/adaptive"]["gap_verdict"] == "worse"
    assert summ["none/adaptive"]["gap_verdict"] == "inconclusive"
    assert "gap_verdict" not in summ["full"]
    assert "worse" in format_summary(list(summ.values()))
    r = CliRunner().invoke(app, ["train", "--seeds", "a"])
    assert r.exit_code == 2 and "--seeds" in r.output


def test_every_registered_selection_and_estimator_has_a_cost():
    """A new selection or estimator must register its cost next to itself, or the frontier would hide it."""
    from attnlab.reconstruct.cost import SELECTION_COSTS
    from attnlab.reconstruct.estimators import ESTIMATOR_REGISTRY, EstimatorKind
    from attnlab.reconstruct.selection import SELECTIONS

    assert [n for n in SELECTIONS.names() if n not in SELECTION_COSTS] == []
    assert [n for n in ESTIMATOR_REGISTRY.names() if type(ESTIMATOR_REGISTRY.get(n)).cost is EstimatorKind.cost] == []
    for est in ESTIMATOR_REGISTRY.names():
        for sel in SELECTIONS.names():
            if est == "none" and sel == "oracle":
                continue
            c = cost_breakdown(est, sel, 64, 16, 8, r=2, k=4)
            assert c["compute"] > 0 and all(v >= 0 for v in c["per_row_macs"].values())
