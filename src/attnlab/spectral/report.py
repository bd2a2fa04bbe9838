"""HTML sections for the spectrum and cross-run comparison results."""

from __future__ import annotations

from ..io import RunDir
from ..report.html import table
from .plots import PLOTS


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


def render_section(run: RunDir) -> str:
    """Spectrum section: summary, per-layer table, plots."""
    res = run.section("spectrum") or {}
    model = res.get("model", {})
    n = res["seq_len"]
    parts = [f"<p>Model <b>{model.get('name')}</b> ({model.get('n_layers')} layers x {model.get('n_heads')} heads), "
             f"{res['n_sequences']} windows of {n} tokens, {res.get('world_size', 1)} process(es), "
             f"{res.get('seconds', 0):.1f} s. Rows are pre-softmax score rows, centred per row (softmax is "
             f"shift-invariant). Pooling all layers and heads with equal weight (each head's covariance scaled to unit "
             f"total variance; differences between heads' mean rows excluded), <b>{res['pooled']['k90']}</b> / "
             f"{res['pooled']['k95']} / {res['pooled']['k99']} of {n} eigenvectors explain 90 / 95 / 99% of the "
             "variance.</p>"]
    rows = []
    for l in res["layers"]:
        pl = res["per_layer"][str(l)]
        ks = [res["per_head"][f"{l}.{h}"]["k90"] for h in res["heads"]]
        row = [l, pl["k90"], pl["k95"], pl["k99"], min(ks), sum(ks) / len(ks), max(ks)]
        if res.get("full_matrix"):
            row += _full_cells(res, l)
        rows.append(row)
    header = ["layer", "k90 (heads pooled)", "k95", "k99", "min head k90", "mean head k90", "max head k90"]
    if res.get("full_matrix"):
        header += ["whole-matrix k90, layer", "whole-matrix k90, heads min / median / max"]
    parts.append(table(header, rows, "{:.3f}"))
    for name, caption in PLOTS.items():
        if run.file(name).exists():
            parts.append(f'<figure><img src="{name}" alt="{caption}"><figcaption>{caption}</figcaption></figure>')
    parts.append(f'<p class="note">Overlap = ||U1^T U2||_F^2 / k with k = {res["basis_k"]}; two random subspaces '
                 f'would give about {res["overlap_chance"]:.2f}. {full_matrix_note(res)}</p>')
    return "".join(parts)


def render_compare(run: RunDir) -> str:
    """Cross-run overlap section."""
    res = run.section("compare") or {}
    rows = [[i] + [float(v) for v in row] for i, row in enumerate(res["overlap"])]
    header = ["layer"] + [str(j) for j in range(len(res["overlap"][0]))]
    img = '<img src="compare_overlap.png" alt="cross overlap">' if run.file("compare_overlap.png").exists() else ""
    return (f"<p>{res['model_a']} (rows) vs {res['model_b']} (columns), k = {res['k']}, chance {res['chance']:.2f}."
            f"</p>{table(header, rows, '{:.3f}')}{img}")
