"""Overlapping text in a matplotlib figure: the rendered boxes of every visible label that intersect.

The report's figures are checked with this in the tests (every figure a report saves, through a hook on
``Figure.savefig``), so a title that runs into the row above, crowded tick labels or a colour-bar label over a
neighbouring axis fail a test instead of reaching a user.
"""

from __future__ import annotations

from typing import Any

from matplotlib.text import Text


def _undrawn_tick_labels(fig: Any) -> set[int]:
    """Ids of tick labels matplotlib keeps but does not draw: ticks outside their axis' view interval."""
    out: set[int] = set()
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            lo, hi = sorted(axis.get_view_interval())
            eps = 1e-9 * max(1.0, abs(hi - lo))
            for tick in axis.get_major_ticks() + axis.get_minor_ticks():
                loc = tick.get_loc()
                if loc is None or not lo - eps <= loc <= hi + eps:
                    out.update((id(tick.label1), id(tick.label2)))
    return out


def _visible_texts(fig: Any) -> list[Text]:
    out = []
    undrawn = _undrawn_tick_labels(fig)
    for t in fig.findobj(Text):
        if id(t) in undrawn or not t.get_visible() or not t.get_text().strip() or t.get_alpha() == 0:
            continue
        ax = getattr(t, "axes", None)
        if ax is not None and not ax.get_visible():
            continue
        out.append(t)
    return out


def text_overlaps(fig: Any, tolerance_px: float = 1.0) -> list[tuple[str, str]]:
    """Pairs of visible, non-empty texts whose rendered boxes overlap by more than ``tolerance_px`` on both axes
    (the figure is drawn first). A text nested in another's box (a label inside a cell) counts as an overlap."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    texts = _visible_texts(fig)
    boxes = [t.get_window_extent(renderer) for t in texts]
    pairs = []
    for i in range(len(texts)):
        a = boxes[i]
        if a.width <= 0 or a.height <= 0:
            continue
        for j in range(i + 1, len(texts)):
            b = boxes[j]
            dx = min(a.x1, b.x1) - max(a.x0, b.x0)
            dy = min(a.y1, b.y1) - max(a.y0, b.y0)
            if dx > tolerance_px and dy > tolerance_px:
                pairs.append((texts[i].get_text(), texts[j].get_text()))
    return pairs
