"""Plots for the sparsity section: Pareto curves (recall vs sparsity, recall vs cost), per-head recall."""

from __future__ import annotations

from pathlib import Path

from ..report.plotting import heatmap, plt, save_figure


def pareto_plot(results: dict[str, dict], path: str | Path, x: str = "sparsity", gold_sparsity: float | None = None) -> Path:
    """Recall against ``x`` (sparsity or cost) for every method; the Pareto front is drawn solid."""
    fig, ax = plt.subplots(figsize=(7.0, 4.6))
    for i, (method, res) in enumerate(results.items()):
        pts = res["points"]
        xs = [p["mean"][x] for p in pts]
        ys = [p["mean"]["recall"] for p in pts]
        color = f"C{i % 10}"
        ax.scatter(xs, ys, s=12, color=color, alpha=0.5)
        if x == "sparsity":
            f = res["front"]
            ax.plot([xs[j] for j in f], [ys[j] for j in f], color=color, label=method, marker="o", ms=3)
        else:  # front: cheapest point for each recall level (lower cost is better)
            front, best = [], -1.0
            for j in sorted(range(len(xs)), key=lambda j: (xs[j], -ys[j])):
                if ys[j] > best:
                    front.append(j)
                    best = ys[j]
            ax.plot([xs[j] for j in front], [ys[j] for j in front], color=color, label=method, marker="o", ms=3)
    if x == "sparsity":
        ax.axvline(0.9, color="grey", lw=0.8, ls="--")
        if gold_sparsity is not None:
            ax.axvline(gold_sparsity, color="black", lw=0.8, ls=":", label=f"gold sparsity {gold_sparsity:.2f}")
        ax.set_xlim(-0.02, 1.02)
    else:
        ax.axvline(1.0, color="grey", lw=0.8, ls="--")
    ax.set(xlabel=x + (" (higher = fewer pairs)" if x == "sparsity" else " (predicted pairs + predictor cost) / valid pairs; lower is better"),
           ylabel="recall of gold entmax edges", title=f"Sparsity predictors: recall vs {x}")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    if x == "sparsity":
        ax.plot([], [], color="grey", lw=0.8, ls="--", label="sparsity 0.9 (reference)")
    else:
        ax.plot([], [], color="grey", lw=0.8, ls="--", label="cost of dense attention")
    ax.legend(fontsize=7, ncol=2, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return save_figure(fig, path)


def head_recall_plot(grid: list[list[float]], method: str, sparsity: float, path: str | Path) -> Path:
    """Heatmap of recall per (layer, head) at one operating point."""
    return heatmap(grid, f"{method}: recall per head at sparsity {sparsity:.2f}", "head", "layer", path, vmin=0.0, vmax=1.0,
                   cbar_label="recall of gold edges")


def training_plot(history: dict, path: str | Path) -> Path:
    """Training loss of the entmax model."""
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    ax.plot(history["step"], history["loss"])
    ax.set(xlabel="step", ylabel="loss", title="entmax model training")
    ax.grid(alpha=0.3)
    return save_figure(fig, path)
