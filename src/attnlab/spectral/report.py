"""HTML sections for the spectrum and cross-run comparison results."""

from __future__ import annotations

import html

from ..io import RunDir
from ..report.html import figure, table
from .plots import PLOTS
from .spread import NOTE, interval_of, spread_line


def _rank(v: int, limit: int) -> str:
    return f"not reached within k={limit}" if v > limit else str(v)


def _full_cells(res: dict, l: int) -> list:
    """Whole-matrix k90 cells of one layer: heads concatenated, and min / median / max over heads."""
    fm = [res["full_matrix"][f"{l}.{h}"] for h in res["heads"] if f"{l}.{h}" in res["full_matrix"]]
    if not fm:
        return ["-", "-"]
    lim = fm[0].get("limit", fm[0].get("sketch_size"))
    ks = sorted(int(f["k90"]) for f in fm)
    lay = (res.get("full_matrix_layers") or {}).get(str(l))
    heads = f"{_rank(ks[0], lim)} / {_rank(ks[len(ks) // 2], lim)} / {_rank(ks[-1], lim)}"
    return [_rank(int(lay["k90"]), lay["limit"]) if lay else "-", heads]


def full_matrix_note(res: dict) -> str:
    """How the whole-matrix ranks were computed and what bounds them."""
    fm = res.get("full_matrix") or {}
    if not fm:
        return ""
    f = next(iter(fm.values()))
    if f.get("method") == "exact":
        return (f"Whole matrices: exact spectra from the Gram matrix of the {f['n_matrices']} row-centred score matrices "
                f"(N^2 = {res['seq_len'] ** 2} entries each); with {f['n_matrices']} samples at most {f['limit']} "
                "eigenvalues are nonzero, so a k90 close to that limit is sample-limited (use more --n-sequences). "
                "'Layer' concatenates the layer's heads into one sample (the paper's per-layer matrix).")
    return (f"Whole matrices: streaming sketch of {f.get('sketch_size')} rows per head (lower-bound eigenvalues, upper-bound "
            "ranks); 'not reached within k=...' means the sketch never explains that share. Runs with at most "
            "--full-exact windows on one process get exact spectra instead.")


def _layer_table(res: dict) -> str:
    """Ranks per layer, with their intervals over windows when the run has them."""
    sp = res.get("rank_interval") or {}
    levels = ("k90", "k95", "k99")
    ci = bool(sp.get("per_layer"))
    pct = f"{round(100 * sp.get('confidence', 0.95))}% interval"
    rows = []
    for l in res["layers"]:
        pl = res["per_layer"][str(l)]
        ks = [res["per_head"][f"{l}.{h}"]["k90"] for h in res["heads"]]
        row = [l] + [c for k in levels for c in ([pl[k], interval_of(sp, k, l)] if ci else [pl[k]])]
        row += [min(ks), sum(ks) / len(ks), max(ks)]
        if res.get("full_matrix"):
            row += _full_cells(res, l)
        rows.append(row)
    names = ["k90 (heads pooled)", "k95", "k99"]
    header = ["layer"] + [c for name in names for c in ([name, pct] if ci else [name])]
    header += ["min head k90", "mean head k90", "max head k90"]
    if res.get("full_matrix"):
        header += ["whole-matrix k90, layer", "whole-matrix k90, heads min / median / max"]
    caption = "Ranks per layer (real layer indices); the head columns show the spread across heads."
    if ci:
        caption += f" Intervals: {sp['method']}, {sp['groups']} groups; {html.escape(NOTE)}."
    return table(header, rows, "{:.1f}", caption=caption)


def render_section(run: RunDir) -> str:
    """Spectrum section: summary, per-layer table, plots (with captions), top eigenvectors drawn as rows."""
    from ..report.views import eigenvector_figure

    res = run.section("spectrum") or {}
    model = res.get("model", {})
    n = res["seq_len"]
    asked = (res.get("config") or {}).get("n_sequences")
    used = res["n_sequences"]
    short = (f' <b>Only {used} of the {asked} windows asked for were available.</b>' if asked and used < asked else "")
    parts = [f"<p>Model <b>{html.escape(str(model.get('name')))}</b> ({model.get('n_layers')} layers x "
             f"{model.get('n_heads')} heads), {used} windows of {n} tokens, {res.get('world_size', 1)} process(es), "
             f"{res.get('seconds', 0):.1f} s.{short} Rows are pre-softmax score rows, centred per row (softmax is "
             f"shift-invariant). Pooling all layers and heads with equal weight (each head's covariance scaled to unit "
             f"total variance; differences between heads' mean rows excluded), <b>{res['pooled']['k90']}</b> / "
             f"{res['pooled']['k95']} / {res['pooled']['k99']} of {n} eigenvectors explain 90 / 95 / 99% of the "
             f"variance; {html.escape(spread_line(res))}.</p>"]
    parts.append(_layer_table(res))
    for name, caption in PLOTS.items():
        if run.file(name).exists():
            parts.append(figure(name, caption))
    eig = eigenvector_figure(run, res)
    if eig:
        parts.append(figure(eig, "Top eigenvectors of each layer's pooled score-row covariance, one per row "
                                 "(eigenvector 1 at the top), over key positions. Smooth, position-like patterns "
                                 "mean the low-rank structure is positional; spiky ones point at specific tokens "
                                 "(e.g. [CLS]/[SEP])."))
    parts.append(f'<p class="note">Overlap = ||U1^T U2||_F^2 / k with k = {res["basis_k"]}; two random subspaces '
                 f'would give about {res["overlap_chance"]:.2f}. {full_matrix_note(res)}</p>')
    return "".join(parts)


def render_compare(run: RunDir) -> str:
    """Cross-run overlap section: both runs named with their corpora and settings, and a noise floor."""
    res = run.section("compare") or {}
    la = res.get("label_a") or res.get("model_a")
    lb = res.get("label_b") or res.get("model_b")
    layers_a = res.get("layers_a") or list(range(len(res["overlap"])))
    layers_b = res.get("layers_b") or list(range(len(res["overlap"][0])))
    rows = [[f"{la} L{layers_a[i]}"] + [float(v) for v in row] for i, row in enumerate(res["overlap"])]
    header = ["rows: " + str(la)] + [f"{lb} L{j}" for j in layers_b]
    parts = [f"<p>Rows: <b>{html.escape(str(la))}</b> ({html.escape(str(res.get('run_a')))}); columns: "
             f"<b>{html.escape(str(lb))}</b> ({html.escape(str(res.get('run_b')))}). k = {res['k']} eigenvectors per "
             f"layer, N = {res.get('seq_len')}, chance level {res['chance']:.2f}.</p>"]
    cfgs = [("A", res.get("config_a")), ("B", res.get("config_b"))]
    if any(c for _, c in cfgs):
        keys = sorted(set().union(*[set(c or {}) for _, c in cfgs]) - {"checkpoint_every", "head_chunk"})
        crow = [[k, str((res.get("config_a") or {}).get(k)), str((res.get("config_b") or {}).get(k))] for k in keys]
        parts.append(table(["setting", f"A: {la}", f"B: {lb}"], crow, collapse=0))
    nf = res.get("noise_floor")
    if nf:
        d = nf["diagonal"]
        parts.append(f"<p>Noise floor: the same-layer overlap between two disjoint halves of run A's windows is "
                     f"{min(d):.2f}&ndash;{max(d):.2f} (mean {sum(d) / len(d):.2f}); same-layer overlaps between the "
                     "runs below this range are differences, above it are noise.</p>")
    parts.append(table(header, rows, "{:.3f}", caption="Eigenspace overlap, layer x layer."))
    if run.file("compare_overlap.png").exists():
        parts.append(figure("compare_overlap.png", f"Layer x layer eigenspace overlap between {html.escape(str(la))} "
                                                   f"(rows) and {html.escape(str(lb))} (columns); 1 = same subspace, "
                                                   f"chance {res['chance']:.2f}."))
    return "".join(parts)
