"""No overlapping text in the report's figures (issue 29 item 5): the detector finds a planted overlap, and every
figure builder, on crowded inputs, and every figure a report render draws, has none."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from attnlab.report.overlap import text_overlaps  # noqa: E402


def _bad(found):  # found: the conftest fixture ``saved_overlaps``
    return [(title, pairs) for title, pairs in found if pairs]


def test_detector_finds_a_planted_overlap_and_ignores_undrawn_ticks():
    fig, ax = plt.subplots(figsize=(4, 3))
    ax.plot([0, 1], [0, 1])
    ax.text(0.5, 0.5, "first label", transform=ax.transAxes)
    ax.text(0.52, 0.51, "second label", transform=ax.transAxes)  # planted on top of the first
    assert ("first label", "second label") in text_overlaps(fig)
    plt.close(fig)
    fig, axes = plt.subplots(1, 2, figsize=(6, 3))
    for ax in axes:
        ax.imshow(np.zeros((32, 32)))  # the locator keeps ticks at -5 and 35 that matplotlib does not draw
        ax.set_title("apart")
    assert text_overlaps(fig) == []
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(2, 2))
    ax.set_xticks(range(40), [f"token{i}" for i in range(40)])  # crowded: neighbours overlap
    assert text_overlaps(fig)
    plt.close(fig)


def test_figure_builders_on_crowded_inputs_have_no_overlaps(tmp_path, saved_overlaps):
    from attnlab.report.plotting import curves, heatmap
    from attnlab.report.views import attention_figure, block_figure

    rng = np.random.default_rng(0)
    attn = rng.dirichlet(np.ones(40), size=(4, 40))
    attention_figure(attn, [f"tok{i}" for i in range(40)], 2, [0, 1, 2, 3])
    mass = rng.random((3, 16, 16))
    block_figure(np.tril(rng.random((3, 16, 16)) < 0.3).astype(np.uint8), mass / mass.sum(), 1, [0, 1, 2], 64)
    heatmap(rng.random((12, 12)), "per-head values", "head", "layer", tmp_path / "h.png")
    curves({f"layer {i}": list(rng.random(6)) for i in range(6)}, "TV vs budget", "budget", "TV", tmp_path / "c.png",
           logx=True, xs=[1 / 64, 1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2], hlines=(0.05,), marker="o")
    assert len(saved_overlaps) == 4 and _bad(saved_overlaps) == []


def test_report_figures_have_no_overlaps(spectrum_run, saved_overlaps):
    from attnlab.report.html import render_report

    render_report(spectrum_run)
    assert saved_overlaps and _bad(saved_overlaps) == []
