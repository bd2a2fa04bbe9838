"""The report summary's bottom lines: total compute of the best reconstruction (also when it is a frontier point),
the beats-dense verdict, recall next to the oracle, no interval for one seed, and the speed line."""

from __future__ import annotations

import json

import pytest

from attnlab.report.summary import plain, summary_lines


def _layers(tv):
    return {"0": {"tv": tv}, "1": {"tv": tv / 2}}


RECON = {
    "table": {"proxy+gaussian/adaptive[r=8]": {"selection": "adaptive", "per_layer": _layers(0.032),
                                               "cost": {"compute": 3.06}},
              "gaussian/oracle": {"selection": "oracle", "per_layer": _layers(0.01), "cost": {"compute": 1.0}}},
    "frontier_points": {"proxy-only [b=0, r=4]": {"compute": 0.19, "worst_layer_tv_pooled": 0.40,
                                                  "per_layer_tv": {"0": 0.40, "1": 0.3}}},
    "best": "proxy-only [b=0, r=4]", "best_compute": 0.19, "best_worst_layer_tv": 0.40,
    "best_chosen_at": "total compute <= 0.3", "n_eval": 8, "target_tv": 0.05, "budget_pairs": 32,
}


def test_reconstruct_best_from_frontier_has_compute_and_verdict():
    line = plain(summary_lines({"reconstruct": RECON})[0])
    assert "unavailable" not in line
    assert "proxy-only [b=0, r=4]" in line and "0.19x dense" in line and "0.400" in line
    assert "Nothing beats dense" in line and "3.06x dense" in line  # the cheapest method meeting TV < 0.05


def test_reconstruct_above_dense_says_it_saves_nothing():
    res = {**RECON, "best": "proxy+gaussian/adaptive[r=8]", "best_compute": 3.06, "best_worst_layer_tv": 0.032,
           "frontier_points": {}, "best_chosen_at": "pair budget 32"}
    line = plain(summary_lines({"reconstruct": res})[0])
    assert "3.06x dense" in line and "saves nothing" in line


def test_sparsity_recall_next_to_oracle_and_warnings():
    win = lambda m, n: {"windows_at_0.9": {"recall": {"mean": m, "ci95": 0.01, "n": n}}}  # noqa: E731
    res = {"recall_at_0.9": {"rank": 0.79, "window": 0.3, "oracle-topk": 0.91}, "gold": {"sparsity": 0.376},
           "methods": {"rank": win(0.79, 16), "window": win(0.3, 16), "oracle-topk": win(0.91, 16)},
           "model": {"finetune": {"mlm": {"entmax_no_finetune": {"loss": 6.364}, "entmax_finetuned": {"loss": 6.376}}}},
           "config": {"n_eval": 16}}
    line = plain(summary_lines({"sparsity": res})[0])
    assert "rank, recalls 0.790 ± 0.010 (95% CI over 16 windows)" in line and "oracle-topk 0.910" in line
    assert "below the 0.9 operating point" in line and "fine-tuning made it worse" in line


def test_single_seed_has_no_interval():
    res = {"config": {"task": "and", "s": 2, "seeds": 1},
           "results": [{"T": 8, "m_star": 21, "ci": [21.0, 21.0]}]}
    line = plain(summary_lines({"variables": res})[0])
    assert "21 at T=8" in line and "CI" not in line


def test_speed_line_cpu_note_then_gpu_file(tmp_path):
    from attnlab.io import RunDir
    from attnlab.report.html import render_report
    from attnlab.report.speed import import_speed

    lines = summary_lines({"reconstruct": RECON})
    assert "exact masked path" in plain(lines[-1])
    run = RunDir(tmp_path / "run")
    run.write_section("reconstruct", RECON)
    doc = {"device": "NVIDIA H200", "rows": [
        {"N": 65536, "p": 0.9, "predictor": "minference", "recall_min_head": 0.91, "loss_delta": 0.003,
         "attn_x_cudnn": 1.7, "exec_attn_x_cudnn": 1.71, "exec_fwd_x_cudnn": 1.48},
        {"N": 65536, "p": 0.9, "predictor": "oracle", "recall_min_head": 0.9, "loss_delta": 0.0,
         "attn_x_cudnn": 9.6, "exec_attn_x_cudnn": 9.6, "exec_fwd_x_cudnn": 5.0}]}
    (tmp_path / "prefill.json").write_text(json.dumps(doc))
    import_speed(run.path, [tmp_path / "prefill.json"])
    line = plain(summary_lines(run.results())[-1])
    assert "NVIDIA H200" in line and "x1.71" in line and "minference" in line  # the oracle is a bound, not a result
    text = render_report(run.path).read_text()
    assert 'id="speed"' in text and "measured on NVIDIA H200" in text


def test_speed_file_of_another_layout_is_refused(tmp_path):
    from attnlab.errors import ResultsError
    from attnlab.report.speed import read_speed_file

    (tmp_path / "x.json").write_text(json.dumps({"foo": 1}))
    with pytest.raises(ResultsError, match="not a speed result"):
        read_speed_file(tmp_path / "x.json")


def test_plain_progress_heartbeat_and_eta():
    from attnlab.progress import PlainProgress

    t = [0.0]
    lines = []
    p = PlainProgress("fit", 4, lines.append, heartbeat=10, clock=lambda: t[0])
    t[0] = 5
    p.advance()
    assert lines == []
    t[0] = 20
    p.advance()
    assert lines == ["fit: 2/4, 20 s so far, about 20 s left"]
    p.done()
    assert lines[-1] == "fit: 2/4 done in 20 s"


def test_cli_warnings_carry_the_warning_prefix(capsys):
    import logging

    from attnlab.logs import setup_cli_logging

    setup_cli_logging("INFO")
    logging.getLogger("attnlab.test").warning("only 3 windows")
    assert "warning: only 3 windows" in capsys.readouterr().err
