"""Spectrum plots: explained variance per layer, k90 heatmap, overlap heatmaps."""

from __future__ import annotations

from typing import Any

from ..io import RunDir
from ..report.plotting import curves, heatmap

PLOTS = {
    "spectrum_curves.png": "Explained variance of centred score rows per layer (heads pooled with equal weight), "
                           "k = 1 to N. Grey lines: 90% (dashed) and 99% (dotted) of the variance; the k where a curve crosses a "
                           "line is that layer's k90 / k99 in the table.",
    "spectrum_k90.png": "Rank k90 needed for 90% of score-row variance, per layer (rows, real layer indices) and "
                        "head (columns). Lower = more compressible head.",
    "spectrum_overlap_layers.png": "Overlap of the top-k row eigenspaces between layers (1 = same subspace, "
                                   "the chance level for random subspaces is in the title).",
    "spectrum_full_curves.png": "Explained variance of whole score matrices per layer: exact with the heads "
                                "concatenated when the run kept every matrix, else a head-averaged streaming sketch "
                                "(a lower bound that may stop below the dashed 90% line; such ranks read '>limit').",
}


def plot_spectrum(run: RunDir, res: dict[str, Any]) -> list[str]:
    """Write the spectrum PNGs into the run directory; returns their file names."""
    layers, heads = res["layers"], res["heads"]
    made = []
    series = {f"layer {l}": res["per_layer"][str(l)]["curve"] for l in layers}
    curves(series, "Row scores: explained variance", "k (eigenvectors)", "fraction of variance",
           run.file("spectrum_curves.png"), hlines=(0.9, 0.99), hline_labels=("90% of variance", "99% of variance"))
    made.append("spectrum_curves.png")
    heatmap(res["k90_grid"], "k for 90% row variance", "head", "layer", run.file("spectrum_k90.png"),
            fmt="{:.0f}", cmap="magma", xticklabels=[str(h) for h in heads], yticklabels=[str(l) for l in layers],
            cbar_label=f"k90 (of N = {res['seq_len']})")
    made.append("spectrum_k90.png")
    heatmap(res["overlap_layers"], f"Layer eigenspace overlap (k={res['basis_k']}, chance {res['overlap_chance']:.2f})",
            "layer", "layer", run.file("spectrum_overlap_layers.png"), vmin=0, vmax=1,
            xticklabels=[str(l) for l in layers], yticklabels=[str(l) for l in layers],
            cbar_label="subspace overlap")
    made.append("spectrum_overlap_layers.png")
    if res.get("full_matrix"):
        series = {}
        lay = res.get("full_matrix_layers") or {}
        for l in layers:
            if str(l) in lay:
                series[f"layer {l}"] = lay[str(l)]["curve"]
                continue
            cs = [res["full_matrix"][f"{l}.{h}"]["curve"] for h in heads]
            series[f"layer {l}"] = [sum(c[i] for c in cs) / len(cs) for i in range(len(cs[0]))]
        how = "exact, heads concatenated" if lay else "sketch: lower bound"
        curves(series, f"Whole score matrices: explained variance ({how})", "k",
               "fraction of variance", run.file("spectrum_full_curves.png"), hlines=(0.9,),
               hline_labels=("90% of variance",))
        made.append("spectrum_full_curves.png")
    return made
