"""Plots for the variables section: m*(T) with seeds and fitted laws, and the attention probe."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np


COMPLEXITY_PNG = "variables_mstar.png"
PROBE_PNG = "variables_probe.png"
NORM_PNG = "variables_norm_sweep.png"


def _plt():
    """matplotlib.pyplot with the headless Agg backend (imported when a plot is drawn, not with this module)."""
    from ..report.plotting import plt

    return plt


def save_figure(fig, path: str | Path) -> Path:
    """The shared atomic PNG write (:func:`attnlab.report.plotting.save_figure`), imported lazily."""
    from ..report.plotting import save_figure as save

    return save(fig, path)


def _curve(ax, results: Sequence[Mapping[str, Any]], fits: Optional[Mapping[str, Any]], color: str, name: str) -> None:
    """One learner: median m*(T) with bootstrap CI bars, per-seed points, fitted laws, unreached T marked."""
    from .fit import LAWS

    done = [r for r in results if r.get("m_star") is not None]
    for r in results:
        pts = [(r["T"], m) for m in r.get("per_seed", {}).values() if m is not None]
        if pts:
            ax.scatter(*zip(*pts), s=10, alpha=0.35, color=color)
    if done:
        T = np.array([r["T"] for r in done], dtype=float)
        y = np.array([r["m_star"] for r in done], dtype=float)
        lo = np.array([r.get("ci", [None, None])[0] or v for r, v in zip(done, y)], dtype=float)
        hi = np.array([r.get("ci", [None, None])[1] or v for r, v in zip(done, y)], dtype=float)
        ax.errorbar(T, y, yerr=[y - lo, hi - y], fmt="o-", color=color, capsize=3, label=f"{name}: median m*, 95% CI")
    for r in results:
        if r.get("m_star") is None:
            ax.scatter([r["T"]], [r.get("m_max", 1)], marker="^", color=color, s=40,
                       label=f"{name}: not learned up to m_max")
    if fits and done:
        Ts = np.geomspace(min(r["T"] for r in done), max(r["T"] for r in done), 100)
        for law, style in (("log", "--"), ("power", ":")):
            f = fits[law]
            label = (f"{name}: a + b log T (R2 {f['r2']:.2f})" if law == "log"
                     else f"{name}: a + b T^c (c = {f['params']['c']:.2f})")
            ax.plot(Ts, LAWS[law](Ts, **f["params"]), style, color=color, alpha=0.8, label=label)


def plot_complexity(section: Mapping[str, Any], path: str | Path) -> Path:
    """m*(T) of the model and of the contrast learner on one log-log plot, with CIs, seeds and fits."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    _curve(ax, section.get("results", []), section.get("fits"), "tab:blue", section.get("model", "model"))
    con = section.get("contrast") or {}
    if con.get("results"):
        _curve(ax, con["results"], con.get("fits"), "tab:red", con.get("model", "contrast"))
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_xlabel("context length T")
    ax.set_ylabel("train size m* reaching the threshold")
    handles, labels = ax.get_legend_handles_labels()
    uniq = dict(zip(labels, handles))
    ax.legend(uniq.values(), uniq.keys(), fontsize=7)
    ax.set_title("Sample complexity vs context length (dots: seeds)")
    fig.tight_layout()
    return save_figure(fig, path)


def plot_norm_sweep(sweep: Mapping[str, Any], path: str | Path) -> Path:
    """m* at fixed T against the qk norm bound (median and CI; seeds as dots)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    rs = sweep["results"]
    for r in rs:
        pts = [(r["qk_bound"], m) for m in r.get("per_seed", {}).values() if m is not None]
        if pts:
            ax.scatter(*zip(*pts), s=10, alpha=0.35, color="tab:blue")
    done = [r for r in rs if r.get("m_star") is not None]
    if done:
        b = np.array([r["qk_bound"] for r in done], dtype=float)
        y = np.array([r["m_star"] for r in done], dtype=float)
        lo = np.array([r["ci"][0] or v for r, v in zip(done, y)], dtype=float)
        hi = np.array([r["ci"][1] or v for r, v in zip(done, y)], dtype=float)
        ax.errorbar(b, y, yerr=[y - lo, hi - y], fmt="o-", capsize=3, label="median m*, 95% CI")
    for r in rs:
        if r.get("m_star") is None:
            ax.scatter([r["qk_bound"]], [r.get("m_max", 1)], marker="^", color="tab:red", label="not learned up to m_max")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_xlabel("bound on ||W_Q^T W_K||_F")
    ax.set_ylabel("m*")
    ax.set_title(f"Norm / sample trade-off at T = {sweep['T']}")
    handles, labels = ax.get_legend_handles_labels()
    uniq = dict(zip(labels, handles))
    ax.legend(uniq.values(), uniq.keys(), fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)  # atomic: a killed run never leaves a half-written PNG


def plot_probe(probe: Mapping[str, Any], path: str | Path) -> Path:
    """Bars per seed: readout attention mass on the s relevant positions and top-s precision (mean over heads)."""
    plt = _plt()
    seeds = list(probe["per_seed"])
    mass = [float(np.mean(probe["per_seed"][k]["mass"])) for k in seeds]
    topk = [float(np.mean(probe["per_seed"][k]["topk_precision"])) for k in seeds]
    x = np.arange(len(seeds))
    fig, ax = plt.subplots(figsize=(max(4, 0.7 * len(seeds) + 2), 3.5))
    w = 0.38
    ax.bar(x - w / 2, mass, w, label="mass on relevant")
    ax.bar(x + w / 2, topk, w, label="top-s precision")
    ax.axhline(probe.get("uniform_mass", 0), color="gray", ls=":", label="uniform attention")
    ax.set_xticks(x, [f"seed {k}" for k in seeds])
    ax.set_ylim(0, 1.05)
    ax.set_title(f"Readout attention at T = {probe['T']} (each seed at its m*)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside the axes: covers no bar
    fig.tight_layout()
    return save_figure(fig, path)  # atomic: a killed run never leaves a half-written PNG
