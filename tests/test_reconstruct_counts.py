"""One method count for `reconstruct run`: the CLI's evaluation line, its table, its closing line, the report's
method table and its summary all count the same rows (they said 17, 21 and 20 before) and name the oracle bounds
and frontier points apart."""

from __future__ import annotations

import logging
import re

import pytest

from attnlab.io import RunDir


def _row(sel: str, tv: float) -> dict:
    return {"selection": sel, "per_layer": {"0": {"tv": tv}}, "mean": {"rel_err": 0.5, "top1": 0.9, "kl": 0.1},
            "budget_pairs": 8, "cost": {"compute": 0.4 + tv}}


def _results() -> dict:
    table = {f"gaussian/{s}": _row(s, 0.1 + i / 100) for i, s in enumerate(("random", "leverage", "qr", "local"))}
    table["gaussian/oracle"] = _row("oracle", 0.05)
    front = {f"proxy-only [b=0, r={r}]": {"compute": r / 32, "worst_layer_tv_pooled": 0.4, "per_layer_tv": {"0": 0.4}}
             for r in (2, 4)}
    return {"table": table, "frontier_points": front, "best": "gaussian/random", "best_compute": 0.5,
            "best_worst_layer_tv": 0.1, "best_chosen_at": "pair budget 8", "n_eval": 4, "target_tv": 0.05,
            "budget_pairs": 8, "budget_fraction": 0.25, "model": {"name": "tiny"}, "fit": {"n_sequences": 8}}


def test_methods_text_counts_rows_oracles_and_frontier_points():
    from attnlab.report.summary import method_counts, methods_text

    res = _results()
    assert method_counts(res) == {"table": 5, "oracle": 1, "frontier": 2}
    assert methods_text(res) == "5 methods (1 of them oracle bound) + 2 frontier points"
    assert methods_text({"table": {"a": _row("random", 0.1)}}) == "1 method"


def test_cli_table_report_and_summary_agree(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import attnlab.reconstruct.run as run_mod
    from attnlab.cli import app

    out = tmp_path / "run"
    res = _results()

    def fake(o, progress=True, **settings):
        RunDir(o).write_section("reconstruct", res)
        return res

    monkeypatch.setattr(run_mod, "reconstruct", fake)
    r = CliRunner().invoke(app, ["reconstruct", "run", "--out", str(out), "--quiet"])
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    sep = next(i for i, ln in enumerate(lines) if set(ln) == {"-"})
    rows = [ln for ln in lines[sep + 1:] if ln.split(" ")[0] in res["table"]]
    assert len(rows) == 5
    assert "5 methods (1 of them oracle bound) + 2 frontier points; best gaussian/random" in r.output
    html = (out / "report.html").read_text()
    assert "the best (oracle bounds excluded) of 5 methods (1 of them oracle bound) + 2 frontier points" in html
    assert "5 methods (1 of them oracle bound): softmax total variation" in html  # the report table's caption
    assert not re.search(r"\b(4|6|7) methods\b", html + r.output)


@pytest.mark.slow
def test_real_run_evaluation_line_counts_table_rows(tmp_path, caplog):
    """The evaluation line counted the estimator x selection grid (17) and left out the --extra-ranks rows."""
    from attnlab.report.summary import methods_text
    from attnlab.reconstruct.run import reconstruct

    with caplog.at_level(logging.INFO, logger="attnlab"):
        res = reconstruct(tmp_path / "r", seq_len=32, n_fit=8, n_eval=4, layers=[0], budgets=[], dropin=False,
                          estimators=["gaussian", "proxy+gaussian"], selections=["random", "adaptive"], position=False,
                          progress=True)
    line = next(m for m in caplog.messages if m.startswith("evaluated "))
    assert len(res["table"]) == 6  # 4 combinations + the 2 adaptive ones again at --extra-ranks 8
    assert line.startswith(f"evaluated {methods_text({'table': res['table']})} on") and "6 methods" in line
