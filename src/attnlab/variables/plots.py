"""Plots for the variables section: m*(T) with seeds and fitted laws, and the attention probe."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from ..io import atomic_path

COMPLEXITY_PNG = "variables_mstar.png"
PROBE_PNG = "variables_probe.png"


def _plt():
    """matplotlib.pyplot with the headless Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_complexity(results: Sequence[Mapping[str, Any]], fits: Optional[Mapping[str, Any]], path: str | Path) -> Path:
    """m*(T) (line), per-seed smallest successful m (points) and fitted laws, log-scaled T axis."""
    from .fit import LAWS

    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    done = [r for r in results if r.get("m_star") is not None]
    for r in results:
        pts = [(r["T"], m) for m in r.get("per_seed", {}).values() if m is not None]
        if pts:
            ax.scatter(*zip(*pts), s=14, alpha=0.5, color="tab:gray")
    if done:
        ax.plot([r["T"] for r in done], [r["m_star"] for r in done], "o-", color="tab:blue", label="m*(T)")
    if fits:
        Ts = np.geomspace(min(r["T"] for r in done), max(r["T"] for r in done), 100)
        for law, style in (("log", "--"), ("power", ":")):
            f = fits[law]
            best = " (best)" if fits.get("best") == law else ""
            label = {"log": "a + b log T", "power": "a + b T^c"}[law] + best
            ax.plot(Ts, LAWS[law](Ts, **f["params"]), style, label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context length T")
    ax.set_ylabel("samples m* to reach threshold")
    ax.legend(fontsize=8)
    ax.set_title("Sample complexity vs context length")
    fig.tight_layout()
    try:
        with atomic_path(path, suffix=".png") as tmp:  # a killed run never leaves a half-written PNG
            fig.savefig(tmp, dpi=110)
    finally:
        plt.close(fig)
    return Path(path)


def plot_probe(probe: Mapping[str, Any], path: str | Path) -> Path:
    """Bars per (layer, head): readout attention mass on relevant positions, top-s and support precision."""
    plt = _plt()
    labels, mass, topk, sprec = [], [], [], []
    for layer, row in enumerate(probe["mass"]):
        for h, v in enumerate(row):
            labels.append(f"L{layer}H{h}")
            mass.append(v)
            topk.append(probe["topk_precision"][layer][h])
            sprec.append(probe["support_precision"][layer][h])
    x = np.arange(len(labels))
    fig, ax = plt.subplots(figsize=(max(4, 0.9 * len(labels) + 2), 3.5))
    w = 0.27
    ax.bar(x - w, mass, w, label="mass on relevant")
    ax.bar(x, topk, w, label="top-s precision")
    ax.bar(x + w, sprec, w, label="support precision")
    ax.set_xticks(x, labels)
    ax.set_ylim(0, 1.05)
    ax.set_title(f"Readout attention ({probe.get('attention', '?')})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    try:
        with atomic_path(path, suffix=".png") as tmp:  # a killed run never leaves a half-written PNG
            fig.savefig(tmp, dpi=110)
    finally:
        plt.close(fig)
    return Path(path)
