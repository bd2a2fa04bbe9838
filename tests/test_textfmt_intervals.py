"""Intervals as printed: rounded, infinite ends named 'unbounded', no raw inf (issue 29, item 7)."""

from __future__ import annotations

import math

import numpy as np

from attnlab.textfmt import interval
from attnlab.variables.fit import LawFit, _verdict, fit_laws
from attnlab.variables.plots import _interval, verdict_line

INF = math.inf


def test_one_unbounded_end_is_named_and_the_other_rounded():
    assert interval([-0.7351234, INF]) == "[-0.735, unbounded)"
    assert interval([-INF, 1.23456]) == "(unbounded, 1.23]"
    assert interval([-0.7351234, 2.5]) == "[-0.735, 2.5]"
    assert "inf" not in interval([-INF, INF])


def _fits(c_ci, b_lo=1.0):
    log = LawFit("log", {"a": 0.0, "b": 2.0}, 0.9, 0.0, 0.0, ci={"b": [b_lo, 3.0]})
    power = LawFit("power", {"a": 0.0, "b": 1.0, "c": 0.1}, 0.9, 0.0, 0.0, ci={"c": list(c_ci)})
    return log, power


def test_verdict_reads_unbounded_not_inf():
    _, reason = _verdict(*_fits([-0.7351234, INF]), 0.25, 0.95)
    assert "exponent c in [-0.735, unbounded) (95%)" in reason and "inf" not in reason
    _, reason = _verdict(*_fits([-INF, INF]), 0.25, 0.95)
    assert "unbounded (the data do not pin it down)" in reason and "inf" not in reason and " in unbounded" not in reason
    _, reason = _verdict(*_fits([0.123456, 0.98765]), 0.25, 0.95)
    assert "[0.123, 0.988]" in reason


def test_fitted_laws_and_plot_labels_print_no_raw_inf():
    rng = np.random.default_rng(3)
    T = np.array([16, 32, 64, 128, 256, 512, 1024, 2048, 4096], dtype=float)
    flat = fit_laws(T, 60 + rng.normal(0, 25, len(T)))  # no growth: an end of c's interval at the grid's edge
    assert math.isinf(flat.power.ci["c"][0]) or math.isinf(flat.power.ci["c"][1])
    target = {"fits": flat.to_dict()}
    line = verdict_line("model", target)
    assert "unbounded" in line and "inf" not in line.replace("unbounded", "")
    assert _interval(["-inf", 0.5]) == "(unbounded, 0.5]"  # JSON may hold the ends as strings


def test_variables_report_cells_name_unbounded_ends_and_one_seed():
    from attnlab.textfmt import NO_INTERVAL
    from attnlab.variables.report import _ci

    assert _ci([40, None], 3) == "[40, unbounded)"
    assert _ci([21, 21], 1) == NO_INTERVAL  # one seed: no [21, 21]
    assert _ci([21, 21], 3) == "[21, 21]"  # three seeds that agree: a real (degenerate) interval
    assert _ci([-31.216380043874913, 45.158180663281264]) == "[-31.2, 45.2]"
