"""Numbers with their spread (issue 29 item 7): recall@0.9 in the report carries its interval over windows, and
a single seed / layer shows no interval ('n/a (1 seed)', 'no spread'), never '± 0' or a degenerate CI."""

from __future__ import annotations

import re

from attnlab.io import RunDir
from attnlab.report.summary import plain, summary_lines


def _stats(m, sd, n):
    return {"mean": m, "std": sd, "n": n}


def _train_section(n_seeds: int) -> dict:
    sd = 0.0 if n_seeds == 1 else 0.02
    summ = [{"objective": "clm", "label": lab, "budget": b, "compute": c, "heldout_loss": _stats(5.4, sd, n_seeds),
             "gap_to_full": None if lab == "full" else _stats(0.01, sd, n_seeds)}
            for lab, b, c in (("full", None, 1.0), ("gaussian/random", 0.5, 2.4))]
    if n_seeds > 1:
        summ[1].update({"gap_ci95": [-0.04, 0.06], "gap_verdict": "inconclusive"})
    return {"train": {"task": "clm", "runs": [], "summary": summ}}


def test_reconstruct_train_table_one_seed_shows_no_spread(tmp_path):
    from attnlab.reconstruct.report import render_section

    run = RunDir(tmp_path / "one")
    run.write_section("reconstruct", _train_section(1))
    html = render_section(run)
    rows = re.findall(r"<tr>(.*?)</tr>", html, re.S)
    body = [r for r in rows if "gaussian/random" in r or ">full<" in r]
    assert len(body) == 2 and all("n/a (1 seed)" in r for r in body)
    assert not any(re.search(r">0(\.0+)?<", r) for r in body)  # no sd of 0 shown as a number
    run2 = RunDir(tmp_path / "three")
    run2.write_section("reconstruct", _train_section(3))
    html = render_section(run2)
    assert "n/a (1 seed)" not in html and "0.02" in html and "inconclusive" in html


def test_sparsity_report_recall_table_has_window_interval(tmp_path):
    from attnlab.sparsity.report import render_section

    pts = [{"knob": 1, "mean": {"sparsity": 0.9, "recall": 0.8, "exact": 0.1, "cost": 0.2, "comp_sparsity": 0.9}}]
    methods = {"rank": {"knob": "k", "points": pts,
                        "windows_at_0.9": {"recall": {"mean": 0.791, "ci95": 0.0123, "std": 0.025, "n": 16}}},
               "window": {"knob": "w", "points": pts, "windows_at_0.9": {"recall": {"mean": 0.3, "std": 0.0, "n": 1,
                                                                                  "ci95": None}}}}
    run = RunDir(tmp_path / "sp")
    run.write_section("sparsity", {"recall_at_0.9": {"rank": 0.79, "window": 0.3}, "methods": methods,
                                   "gold": {"sparsity": 0.95}, "model": {}})
    html = render_section(run)
    table = html[html.index("Recall at sparsity 0.9"):html.index("All operating points")]
    rank_row = next(r for r in re.findall(r"<tr>(.*?)</tr>", table, re.S) if "rank" in r)
    assert "0.012" in rank_row and "0.791" in rank_row and ">16<" in rank_row and "95% CI" in table
    window_row = next(r for r in re.findall(r"<tr>(.*?)</tr>", table, re.S) if ">window<" in r)
    assert "0.3" in window_row and "&mdash;" in window_row  # one window: no interval


def test_summary_one_layer_has_no_plus_minus():
    one = {"overlap": [[0.5]], "chance": 0.1, "label_a": "a", "label_b": "b", "noise_floor": {"diagonal": [0.9]}}
    line = plain(summary_lines({"compare": one})[0])
    assert "±" not in line and "one layer: no spread" in line
    two = {**one, "overlap": [[0.5, 0.1], [0.2, 0.7]]}
    assert "0.600 ± 0.141 (sd across 2 layers" in plain(summary_lines({"compare": two})[0])


def test_reconstruct_frontier_one_window_group_shows_no_sd(tmp_path):
    from attnlab.reconstruct.report import render_section

    def point(n_chunks):
        return {"family": "proxy-only", "compute": 0.1, "budget_pairs": 0, "proxy_rank": 2, "n_chunks": n_chunks,
                "worst_layer_tv": {"mean": 0.4, "std": 0.0 if n_chunks == 1 else 0.03}, "mean_tv": {"mean": 0.3},
                "worst_layer_tv_pooled": 0.4}

    from attnlab.reconstruct.frontier import frontier_curves

    for n, want in ((1, "n/a (1 group)"), (4, "0.03")):
        pts = {"proxy-only [b=0, r=2]": point(n)}
        run = RunDir(tmp_path / str(n))
        run.write_section("reconstruct", {"frontier_points": pts, "frontier": frontier_curves(pts)})
        row = next(r for r in re.findall(r"<tr>(.*?)</tr>", render_section(run), re.S) if "proxy-only" in r)
        assert want in row


def test_summary_names_a_head_subset_drop_in():
    """reconstruct run --heads 0,1: the summary's drop-in figure says the other heads stayed exact."""
    layers = {"0": {"tv": 0.1}}
    res = {"table": {"gaussian/random": {"selection": "random", "per_layer": layers, "cost": {"compute": 0.7}}},
           "best": "gaussian/random", "best_compute": 0.7, "best_worst_layer_tv": 0.1, "n_eval": 4,
           "dropin": [{"method": "gaussian/random", "sentence_cosine": 0.999, "heads": [0, 1], "exact_heads": [2, 3]}]}
    line = plain(summary_lines({"reconstruct": res})[0])
    assert "As drop-in attention (heads 0, 1 only; the other heads kept exact attention)" in line
    del res["dropin"][0]["heads"], res["dropin"][0]["exact_heads"]
    assert "As drop-in attention: sentence-embedding cosine 0.9990" in plain(summary_lines({"reconstruct": res})[0])
