"""Intervals over windows for k90 / k95 / k99 (delete-one-group jackknife of the row statistics)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats as sstats

from attnlab.capture.hf import AttentionCall
from attnlab.errors import ConfigError
from attnlab.spectral.analysis import summarise
from attnlab.spectral.collector import SpectrumCollector
from attnlab.spectral.eigen import explained_variance, ranks_for
from attnlab.spectral.spread import fractional_rank, rank_spread, window_groups
from attnlab.spectral.stats import StreamingCovariance

LEVELS = (0.9, 0.95, 0.99)


def _collector(n_windows: int, seq_len: int = 12, heads: int = 2, groups: int = 8, seed: int = 0):
    """A collector fed random queries / keys through real attention calls (two layers)."""
    g = torch.Generator().manual_seed(seed)
    col = SpectrumCollector([0, 1], list(range(heads)), seq_len, sketch_size=0, spread_groups=groups,
                            window_group=window_groups(n_windows, groups))
    for _ in range(0, n_windows, 4):
        for layer in (0, 1):
            q = torch.randn(4, heads, seq_len, 6, generator=g)
            k = torch.randn(4, heads, seq_len, 6, generator=g)
            col(AttentionCall(layer, q, k, k, None, None, 0.5))
    return col


def test_interval_contains_the_point_estimate():
    res, _ = summarise(_collector(32))
    sp = res["rank_interval"]
    assert sp["groups"] == 8 and sum(sp["rows_per_group"]) == res["n_rows"]["0.0"]
    for key in ("k90", "k95", "k99"):
        lo, hi = sp["pooled"][key]
        assert lo <= res["pooled"][key] <= hi
        for l in ("0", "1"):
            lo, hi = sp["per_layer"][l][key]
            assert lo <= res["per_layer"][l][key] <= hi
    assert sp["pooled"]["se"]["k90"] > 0


def _known_spectrum_groups(n_windows: int, seed: int, dim: int = 24, rows: int = 4, groups: int = 8):
    """Windows of ``rows`` rows each, drawn from N(0, diag(0.85^i)) in a random basis; per-group statistics."""
    rng = np.random.default_rng(seed)
    lam = 0.85 ** np.arange(dim)
    basis, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
    x = (rng.standard_normal((n_windows, rows, dim)) * np.sqrt(lam)) @ basis.T
    ids = window_groups(n_windows, groups)
    total = StreamingCovariance(dim, groups=1)
    parts = [StreamingCovariance(dim, groups=1) for _ in range(groups)]
    for w in range(n_windows):
        sample = torch.from_numpy(x[w])[None]
        total.update(sample)
        parts[int(ids[w])].update(sample)
    true = ranks_for(explained_variance(torch.from_numpy(lam)))
    return {0: total}, {0: parts}, true


def test_interval_narrows_with_more_windows_on_a_known_spectrum():
    few = rank_spread(*_known_spectrum_groups(64, seed=1)[:2])
    totals, groups, true = _known_spectrum_groups(2048, seed=2)
    many = rank_spread(totals, groups)
    for key in ("k90", "k95"):
        assert many["pooled"]["se"][key] < 0.5 * few["pooled"]["se"][key], key  # about 1/sqrt(32) of it
        lo, hi = many["pooled"][key]
        assert lo <= true[key] <= hi, (key, true[key], many["pooled"][key])
        assert hi - lo <= few["pooled"][key][1] - few["pooled"][key][0]


def _reference_interval(x: np.ndarray, ids: np.ndarray, level: float) -> tuple[list[int], float, float]:
    """The jackknife in float64 numpy straight from the samples (heads pooled with unit-trace covariances)."""
    def frac(samples: np.ndarray) -> float:
        covs = [np.cov(samples[:, h].T) for h in range(samples.shape[1])]
        pooled = np.mean([c / np.trace(c) for c in covs], 0)
        ev = np.sort(np.clip(np.linalg.eigvalsh(pooled), 0, None))[::-1]
        curve = np.cumsum(ev) / ev.sum()
        k = int(np.argmax(curve >= level - 1e-12)) + 1
        prev = curve[k - 2] if k >= 2 else 0.0
        return (k - 1) + (level - prev) / (curve[k - 1] - prev)

    point = frac(x)
    reps = [frac(x[ids != g]) for g in np.unique(ids)]
    G = len(reps)
    se = math.sqrt((G - 1) / G * np.sum((np.array(reps) - np.mean(reps)) ** 2))
    t = sstats.t.ppf(0.975, G - 1)
    k = math.ceil(point - 1e-9)
    ci = [min(k, max(1, math.ceil(point - t * se - 1e-9))), max(k, min(x.shape[2], math.ceil(point + t * se - 1e-9)))]
    return ci, se, (G - 1) * (np.mean(reps) - point)


def test_jackknife_matches_a_float64_reference_on_a_tiny_case():
    rng = np.random.default_rng(3)
    dim, heads, G = 6, 2, 4
    x = rng.standard_normal((40, heads, dim)) * np.array([3.0, 2.0, 1.0, 0.5, 0.2, 0.1]) + 7.0  # rows (n, H, D)
    ids = np.repeat(np.arange(G), 10)
    total = StreamingCovariance(dim, groups=heads)
    parts = [StreamingCovariance(dim, groups=heads) for _ in range(G)]
    for start in range(0, 40, 5):  # batches of 5 rows, as a stream would deliver them
        chunk = torch.from_numpy(x[start:start + 5]).transpose(0, 1)
        total.update(chunk)
        parts[int(ids[start])].update(chunk)
    got = rank_spread({0: total}, {0: parts})
    for level in LEVELS:
        key = f"k{round(level * 100)}"
        want, se, bias = _reference_interval(x, ids, level)
        assert got["pooled"][key] == want, key
        assert got["pooled"]["se"][key] == pytest.approx(se, abs=1e-4)
        assert got["pooled"]["bias"][key] == pytest.approx(bias, abs=1e-4)


def test_fractional_rank_is_between_integer_ranks():
    curve = explained_variance(torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=torch.float64))  # 0.4, 0.7, 0.9, 1.0
    assert fractional_rank(curve, 0.4) == pytest.approx(1.0)
    assert fractional_rank(curve, 0.8) == pytest.approx(2.5)
    assert fractional_rank(curve, 0.2) == pytest.approx(0.5)
    assert math.ceil(fractional_rank(curve, 0.95)) == ranks_for(curve, (0.95,))["k95"]


def test_groups_are_contiguous_and_independent_of_the_process_count():
    whole = window_groups(10, 4)
    assert whole.tolist() == [0, 0, 0, 1, 1, 2, 2, 2, 3, 3]
    split = torch.empty(10, dtype=torch.int64)
    for r in range(3):
        split[r::3] = window_groups(10, 4, r, 3)
    assert torch.equal(split, whole)


def test_too_few_groups_and_bad_settings_say_why():
    from attnlab.spectral.run import SpectrumConfig

    res, _ = summarise(_collector(4, groups=8))
    assert res["rank_interval"]["groups"] == 4  # 4 windows fill 4 of the 8 groups
    one = _collector(4, groups=2)
    one.group_rows[0][1] = StreamingCovariance(12, groups=2)  # an empty group
    one.group_rows[1][1] = StreamingCovariance(12, groups=2)
    assert "reason" in summarise(one)[0]["rank_interval"]
    with pytest.raises(ConfigError, match="--spread-groups"):
        SpectrumConfig(spread_groups=1).validate()
    assert "rank_interval" not in summarise(_collector(4, groups=0))[0]


def test_groups_too_large_for_memory_are_skipped_with_a_warning(monkeypatch, caplog):
    import attnlab.spectral.collector as collector

    monkeypatch.setattr(collector, "SPREAD_MAX_BYTES", 100)
    col = _collector(8)
    assert not col.group_rows and "--spread-groups 8" in caplog.text
    assert "reason" in summarise(col)[0]["rank_interval"]


def test_report_and_summary_show_the_interval_and_the_halves(spectrum_run):
    from attnlab.io import RunDir
    from attnlab.report.summary import summary_lines
    from attnlab.spectral.report import _layer_table, render_section
    from attnlab.spectral.spread import spread_line

    run = RunDir(spectrum_run, create=False)
    res = run.section("spectrum")
    lo, hi = res["rank_interval"]["pooled"]["k90"]
    page = render_section(run)
    assert page.count("95% interval</th>") == 3  # next to k90, k95 and k99 of each layer
    assert f"k90 [{lo}, {hi}]" in page and "each half of the windows" in page and "not the bias" in page
    l0 = str(res["layers"][0])
    assert "[{}, {}]".format(*res["rank_interval"]["per_layer"][l0]["k95"]) in page
    line = next(s for s in summary_lines({"spectrum": res}) if "Spectrum" in s)
    assert f"95% interval over windows [{lo}, {hi}]" in line
    old = {k: v for k, v in res.items() if k != "rank_interval"}  # a run from before the intervals: no column
    assert "interval</th>" not in _layer_table(old) and spread_line(old).startswith("no interval")


def test_rank_vs_length_keeps_and_shows_the_interval(tmp_path):
    from attnlab.io import RunDir
    from attnlab.report.lengths import SECTION, render_section
    from attnlab.report.summary import summary_lines

    run = RunDir(tmp_path / "run")
    pts = [{"seq_len": 32, "n_windows": 16, "k90": 23, "k95": 27, "k99": 30, "k90_halves": [22, 21],
            "k90_interval": [22, 24]},
           {"seq_len": 64, "n_windows": 16, "k90": 45, "k95": 52, "k99": 60, "k90_halves": None}]
    run.write_section(SECTION, {"model": "m", "n_sequences": 16, "points": pts, "settings": {}})
    page = render_section(run)
    assert "95% interval over windows</th>" in page and "[22, 24]" in page and "not that growth" in page
    line = next(s for s in summary_lines({SECTION: run.section(SECTION)}) if "length" in s)
    assert "N = 32: 23 (72%) [95% interval over windows [22, 24]] [halves 22, 21]" in line
    pts[0].pop("k90_interval")
    run.write_section(SECTION, {"model": "m", "n_sequences": 16, "points": pts, "settings": {}})
    assert "interval" not in render_section(run)
