"""Overlapping text in a matplotlib figure: the rendered boxes of every visible label that intersect.

The report's figures are checked with this in the tests (every figure a report saves, through a hook on
``Figure.savefig``), so a title that runs into the row above, crowded tick labels or a colour-bar label over a
neighbouring axis fail a test instead of reaching a user.
"""

from __future__ import annotations

from typing import Any

from matplotlib.text import Text


def _visible_texts(fig: Any) -> list[Text]:
    out = []
    for t in fig.findobj(Text):
        if not t.get_visible() or not t.get_text().strip() or t.get_alpha() == 0:
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
