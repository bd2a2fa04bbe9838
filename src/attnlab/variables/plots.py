"""Plots for the variables section: m*(T) with seeds and fitted laws, and the attention probe."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from ..textfmt import interval


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
            label = (f"a + b log T (R2 {f['r2']:.2f})" if law == "log"
                     else f"a + b T^c (c = {f['params']['c']:.2f}, CI {_interval(f.get('ci', {}).get('c'))})")
            ax.plot(Ts, LAWS[law](Ts, **f["params"]), style, color="k" if law == "log" else "gray", alpha=0.8,
                    label=label)


def _interval(ci: Optional[Sequence[float]]) -> str:
    """[lo, hi] rounded, infinite ends written as 'unbounded' (:func:`attnlab.textfmt.interval`)."""
    if not ci:
        return "?"
    return interval([float(v) for v in ci])  # JSON may hold infinite ends as strings


def verdict_line(name: str, target: Mapping[str, Any]) -> str:
    """'<name>: <verdict> (log R^2 .., c .. CI ..)' or why there is no fit."""
    f = target.get("fits")
    if not f:
        return f"{name}: no fit ({target.get('fit_error') or 'no results'})"
    return (f"{name}: {f['verdict']} (log R2 {f['log']['r2']:.2f}, c = {f['power']['params']['c']:.2f} "
            f"CI {_interval(f['power']['ci'].get('c'))})")


def plot_complexity(section: Mapping[str, Any], path: str | Path) -> Path:
    """The takeaway figure: m*(T) of the bounded head (left) and of the contrast learner (right) on log-x axes
    (a log law is a straight line there), with per-seed points, median and CI, both fits, and the verdicts."""
    plt = _plt()
    con = section.get("contrast") or {}
    panels = [(section, "tab:blue", section.get("model", "model"))]
    if con.get("results"):
        panels.append((con, "tab:red", con.get("model", "contrast")))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.3), squeeze=False)
    cfg = section.get("config") or {}
    for ax, (block, color, name) in zip(axes[0], panels):
        _curve(ax, block.get("results", []), block.get("fits"), color, name)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context length T (log scale)")
        ax.set_ylabel("m*: train size reaching the threshold")
        handles, labels = ax.get_legend_handles_labels()
        uniq = dict(zip(labels, handles))
        ax.legend(uniq.values(), uniq.keys(), fontsize=7, loc="upper left")
        ax.set_title(verdict_line(name, block), fontsize=8)
    fig.suptitle(f"Sample complexity vs context length: {cfg.get('task', '?')}, s = {cfg.get('s', '?')}, "
                 f"{cfg.get('seeds', '?')} seeds (dots)", fontsize=10)
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


def plot_probe(probe: Mapping[str, Any], path: str | Path, results: Sequence[Mapping[str, Any]] = (),
               bounds: Optional[Mapping[str, Any]] = None, caps: Optional[Mapping[int, float]] = None) -> Path:
    """Readout attention mass on the s relevant positions. With recorded per-trial masses: against T (each seed at
    its m*; the cap of the norm bound and uniform attention beside it) and, when the probe against the bound ran,
    against the qk bound at fixed (T, m) with its cap. Otherwise bars per seed at the largest T."""
    plt = _plt()
    pts = [r for r in results if r.get("attn")]
    if pts or bounds:
        n = int(bool(pts)) + int(bool(bounds))
        fig, axes = plt.subplots(1, n, figsize=(5.2 * n, 3.9), squeeze=False)
        axs = list(axes[0])
        if pts:
            ax = axs.pop(0)
            T = np.array([r["T"] for r in pts], dtype=float)
            for r in pts:
                v = list(r["attn"]["mass_per_seed"].values())
                ax.scatter([r["T"]] * len(v), v, s=10, alpha=0.35, color="tab:blue")
            ax.plot(T, [r["attn"]["mass_median"] for r in pts], "o-", color="tab:blue", label="median over seeds (at m*)")
            if caps:
                ax.plot(T, [caps.get(int(t), np.nan) for t in T], "k--", label="cap of the norm bound")
            ax.plot(T, [probe.get("s", 1) / (t + 1) for t in T], ":", color="gray", label="uniform attention")
            ax.axhline(0.5, color="tab:green", lw=0.8, alpha=0.6, label="0.5 (target)")
            ax.set_xscale("log", base=2)
            ax.set_xlabel("context length T")
            ax.set_ylabel("readout mass on the s relevant positions")
            ax.set_ylim(0, 1.05)
            ax.set_title("against T (each seed at its m*)", fontsize=9)
            ax.legend(fontsize=7)
        if bounds:
            ax = axs.pop(0)
            rs = bounds["results"]
            b = np.array([r["qk_bound"] for r in rs], dtype=float)
            for r in rs:
                v = list(r["mass_per_seed"].values())
                ax.scatter([r["qk_bound"]] * len(v), v, s=10, alpha=0.35, color="tab:purple")
            ax.plot(b, [r["mass_median"] for r in rs], "o-", color="tab:purple", label="median over seeds")
            ax.plot(b, [r["cap"] for r in rs], "k--", label="cap of the bound")
            ax.axhline(bounds["uniform_mass"], color="gray", ls=":", label="uniform attention")
            ax.set_xscale("log", base=2)
            ax.set_xlabel("bound on ||W_Q^T W_K||_F")
            ax.set_ylim(0, 1.05)
            ax.set_title(f"against the qk bound at T = {bounds['T']}, m = {bounds['m']}", fontsize=9)
            ax.legend(fontsize=7)
        fig.tight_layout()
        return save_figure(fig, path)
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
