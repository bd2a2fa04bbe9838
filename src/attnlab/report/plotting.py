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
            cmap: str = "viridis") -> Path:
    """A labelled heatmap with optional cell annotations (skipped for large grids)."""
    m = np.asarray(matrix, dtype=float)
    fig, ax = plt.subplots(figsize=(1.0 + 0.45 * m.shape[1], 1.0 + 0.4 * m.shape[0]))
    im = ax.imshow(m, vmin=vmin, vmax=vmax, cmap=cmap, aspect="auto")
    fig.colorbar(im, ax=ax)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.set_xticks(range(m.shape[1]))
    ax.set_yticks(range(m.shape[0]))
    if annotate and m.size <= 400:
        for (i, j), v in np.ndenumerate(m):
            ax.text(j, i, fmt.format(v), ha="center", va="center", fontsize=7,
                    color="white" if (vmax is not None and v < 0.6 * vmax) or (vmax is None and v < m.mean()) else "black")
    return save_figure(fig, path)


def curves(series: dict[str, Sequence[float]], title: str, xlabel: str, ylabel: str, path: str | Path,
           hlines: Sequence[float] = (), logx: bool = False, xs: Optional[Sequence[float]] = None,
           marker: Optional[str] = None) -> Path:
    """Several labelled curves on one axis."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for label, ys in series.items():
        x = xs if xs is not None else np.arange(1, len(ys) + 1)
        ax.plot(x, ys, label=label, marker=marker)
    for h in hlines:
        ax.axhline(h, color="grey", lw=0.8, ls="--")
    if logx:
        ax.set_xscale("log")
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)
