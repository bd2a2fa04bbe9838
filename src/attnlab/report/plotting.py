"""Shared matplotlib helpers (headless Agg backend, consistent style, atomic PNG writes)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ..io import public_mode  # noqa: E402


def save_figure(fig, path: str | Path) -> Path:
    """Save a figure as PNG atomically and close it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110, bbox_inches="tight")
        public_mode(tmp)  # mkstemp creates 0600; published files follow the umask
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def heatmap(matrix: Sequence[Sequence[float]], title: str, xlabel: str, ylabel: str, path: str | Path,
            vmin: Optional[float] = None, vmax: Optional[float] = None, annotate: bool = True, fmt: str = "{:.2f}",
            cmap: str = "viridis", xticklabels: Optional[Sequence[str]] = None,
            yticklabels: Optional[Sequence[str]] = None, cbar_label: str = "value") -> Path:
    """A labelled heatmap with optional cell annotations (skipped for large grids).

    Pass ``xticklabels`` / ``yticklabels`` to keep real indices (e.g. layers 3 and 5, not 0 and 1).
    """
    m = np.asarray(matrix, dtype=float)
    fig, ax = plt.subplots(figsize=(1.6 + 0.45 * m.shape[1], 1.0 + 0.4 * m.shape[0]))
    im = ax.imshow(m, vmin=vmin, vmax=vmax, cmap=cmap, aspect="auto")
    fig.colorbar(im, ax=ax, label=cbar_label)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.set_xticks(range(m.shape[1]), xticklabels if xticklabels is not None else [str(i) for i in range(m.shape[1])])
    ax.set_yticks(range(m.shape[0]), yticklabels if yticklabels is not None else [str(i) for i in range(m.shape[0])])
    if annotate and m.size <= 400:
        lo = np.nanmin(m) if vmin is None else vmin
        hi = np.nanmax(m) if vmax is None else vmax
        for (i, j), v in np.ndenumerate(m):
            # dark text on the bright end of the colour map, white on the dark end
            bright = (v - lo) / (hi - lo) > 0.55 if hi > lo else True
            ax.text(j, i, fmt.format(v), ha="center", va="center", fontsize=7,
                    color=("black" if bright else "white") if cmap in ("viridis", "magma", "Blues_r") else
                    ("white" if bright else "black"))
    return save_figure(fig, path)


def curves(series: dict[str, Sequence[float]], title: str, xlabel: str, ylabel: str, path: str | Path,
           hlines: Sequence[float] = (), logx: bool = False, xs: Optional[Sequence[float]] = None,
           marker: Optional[str] = None, hline_labels: Optional[Sequence[str]] = None,
           bands: Optional[dict[str, tuple[Sequence[float], Sequence[float]]]] = None) -> Path:
    """Several labelled curves on one axis; dashed reference lines carry their own legend entries.

    ``bands``: per series (low, high) drawn as a shaded interval around the curve.
    """
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for i, (label, ys) in enumerate(series.items()):
        x = xs if xs is not None else np.arange(1, len(ys) + 1)
        ax.plot(x, ys, label=label, marker=marker, color=f"C{i % 10}")
        if bands and label in bands:
            lo, hi = bands[label]
            ax.fill_between(x, lo, hi, color=f"C{i % 10}", alpha=0.2, lw=0)
    labels = list(hline_labels) if hline_labels is not None else [f"y = {h:g}" for h in hlines]
    for h, lab, ls in zip(hlines, labels, ("--", ":", "-.", "--")):
        ax.axhline(h, color="grey", lw=0.9, ls=ls, label=lab)
    if logx:
        log_ticks(ax, xs)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def tick_text(x: float) -> str:
    """A short tick label: '1/64' for unit fractions, else '%g'."""
    if 0 < x < 1 and abs(1 / x - round(1 / x)) < 1e-9 * (1 / x):
        return f"1/{round(1 / x)}"
    return f"{x:g}"


def log_ticks(ax, xs: Optional[Sequence[float]] = None, max_labels: int = 10) -> None:
    """Log x axis without matplotlib's crowded minor labels (2x10^-2, 3x10^-2, ... collide on short ranges):
    the data's own x values as labelled ticks when there are few, no minor labels."""
    from matplotlib.ticker import NullFormatter

    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(NullFormatter())
    if xs is not None:
        ticks = sorted({float(x) for x in xs if x > 0})
        if ticks and len(ticks) > max_labels:
            ticks = ticks[:: -(-len(ticks) // max_labels)]
        if ticks:
            ax.set_xticks(ticks, [tick_text(t) for t in ticks])
            ax.xaxis.set_minor_formatter(NullFormatter())
