"""Plots of the reconstruct section: error vs budget per layer, estimator x selection comparison."""

from __future__ import annotations

from typing import Any

from ..io import RunDir
from ..report.plotting import curves, save_figure

TV_TARGET = 0.05


def plot_reconstruct(run: RunDir, res: dict[str, Any]) -> list[str]:
    """Write the PNGs of a reconstruct results section; returns their file names."""
    files: list[str] = []
    table = res.get("table") or {}
    if table:
        labels = sorted(table)
        layers = sorted(next(iter(table.values()))["per_layer"], key=int)
        grid = [[table[lab]["per_layer"][l]["tv"] for l in layers] for lab in labels]
        path = run.file("reconstruct_tv_table.png")
        _labelled_heatmap(grid, labels, [f"L{l}" for l in layers],
                          f"softmax TV per layer at {res.get('budget_pairs')} pairs/row (held-out)", path)
        files.append(path.name)
    sweep = res.get("sweep") or {}
    for lab, by_budget in sweep.items():
        budgets = sorted(by_budget, key=float)
        layers = sorted(by_budget[budgets[0]]["per_layer"], key=int)
        series = {f"layer {l}": [by_budget[b]["per_layer"][l]["tv"] for b in budgets] for l in layers}
        series["mean"] = [by_budget[b]["mean"]["tv"] for b in budgets]
        safe = "".join(c if c.isalnum() else "_" for c in lab).strip("_")
        name = f"reconstruct_sweep_{safe}.png"
        curves(series, f"{lab}: softmax TV vs budget", "pairs per row (fraction)", "mean softmax TV",
               run.file(name), hlines=(TV_TARGET,), xs=[float(b) for b in budgets], marker="o",
               hline_labels=(f"target TV {TV_TARGET:g}",))
        files.append(name)
    front = res.get("frontier") or {}
    if front:
        files.append(plot_frontier(front, run.file("reconstruct_frontier.png")).name)
    train = res.get("train")
    if train and train.get("runs"):
        series = {}
        for r in train["runs"]:
            lab = r["label"] if r["budget"] is None else f"{r['label']} @ {r['budget']}"
            series[lab] = [p["train_loss"] for p in r["curve"]]
        xs = [p["step"] for p in train["runs"][0]["curve"]]
        curves(series, "training with reconstructed attention (char LM)", "step", "train loss (EMA, nats)",
               run.file("reconstruct_train.png"), xs=xs)
        files.append("reconstruct_train.png")
    return files


def plot_frontier(front: dict[str, list[dict[str, Any]]], path, title: str = "") -> Any:
    """Worst-layer TV (mean +- sd over held-out window groups) against total compute, one line per family."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.0, 4.6))
    for fam, pts in front.items():
        xs = [p["compute"] for p in pts]
        ys = [p["worst_layer_tv"]["mean"] for p in pts]
        es = [p["worst_layer_tv"]["std"] for p in pts]
        ax.errorbar(xs, ys, yerr=es, marker="o", ms=3, capsize=2, label=fam)
    ax.axhline(TV_TARGET, color="grey", lw=0.8, ls="--")
    ax.set_yscale("log")
    ax.set(title=title or "worst-layer softmax TV vs total compute (held-out)",
           xlabel="total compute (fraction of dense QK^T multiply-adds)", ylabel="worst-layer TV")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return save_figure(fig, path)


def _labelled_heatmap(grid, rows, cols, title, path) -> None:
    """Heatmap with row / column labels and values (the shared helper has numeric ticks only)."""
    import matplotlib.pyplot as plt
    import numpy as np

    m = np.asarray(grid, dtype=float)
    fig, ax = plt.subplots(figsize=(2.5 + 0.7 * m.shape[1], 1.0 + 0.28 * m.shape[0]))
    im = ax.imshow(m, cmap="magma_r", vmin=0.0, vmax=max(float(np.nanmax(m)), TV_TARGET), aspect="auto")
    fig.colorbar(im, ax=ax, label="softmax total variation (lower is better)")
    ax.set_xticks(range(len(cols)), cols)
    ax.set_yticks(range(len(rows)), rows, fontsize=7)
    ax.set_title(title, fontsize=9)
    for (i, j), v in np.ndenumerate(m):
        ax.text(j, i, f"{v:.3f}", ha="center", va="center", fontsize=6,
                color="white" if v > 0.5 * np.nanmax(m) else "black")
    save_figure(fig, path)
