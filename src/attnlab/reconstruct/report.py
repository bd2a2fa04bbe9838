"""HTML fragment of the ``reconstruct`` section of a run directory (embedded by the report module)."""

from __future__ import annotations

from html import escape

from ..io import RunDir
from ..report.html import cell as _fmt, figure, table as _table

SECTION = "reconstruct"


def render_section(run: RunDir) -> str:
    """The reconstruct section: method table (TV per layer), drop-in effect, training runs, and the PNGs."""
    sec = run.section(SECTION)
    if not sec:
        return "<p>No reconstruct results in this run.</p>"
    parts = []
    table = sec.get("table") or {}
    if table:
        layers = sorted(next(iter(table.values()))["per_layer"], key=int)
        parts.append(
            f"<p>Model {_fmt(sec.get('model', {}).get('name'))}, {_fmt(sec.get('budget_pairs'))} exact pairs per row "
            f"({_fmt(sec.get('budget_fraction'))} of keys), {_fmt(sec.get('n_eval'))} held-out windows; statistics fitted "
            f"on the fit split ({_fmt(sec.get('fit', {}).get('n_sequences'))} windows). Adaptive selection and the proxy "
            f"estimator also use a rank-r score proxy costing r/d_head = {_fmt(sec.get('proxy_cost_fraction'))} of a full "
            f"score computation. Best: <b>{_fmt(sec.get('best'))}</b>, worst-layer TV "
            f"{_fmt(sec.get('best_worst_layer_tv'))} (target {_fmt(sec.get('target_tv'))}).</p>")
        order = sorted(table, key=lambda k: max(v["tv"] for v in table[k]["per_layer"].values()))
        rows = [[lab] + [table[lab]["per_layer"][l]["tv"] for l in layers] +
                [table[lab]["mean"]["rel_err"], table[lab]["mean"]["top1"], table[lab]["mean"]["kl"]] for lab in order]
        parts.append(_table(["method", "estimator"] + [f"TV L{l}" for l in layers] + ["worst-layer TV", "rel. err", "top-1", "KL"],
                            [r[:1] + [table[r[0]].get("estimator", r[0].split("/")[0])] + r[1:1 + len(layers)]
                             + [max(r[1:1 + len(layers)])] + r[1 + len(layers):] for r in rows],
                            group_col=1, caption="Softmax total variation (TV) per layer on held-out windows, "
                            "sorted by worst layer (click a header to re-sort, hover a value for full precision)."))
    for d in sec.get("dropin") or []:
        parts.append(f"<p>Drop-in {_fmt(d['method'])} in layers {_fmt(d['layers'])}: hidden-state cosine "
                     f"{_fmt(d['hidden_cosine'])}, sentence-embedding cosine {_fmt(d['sentence_cosine'])}"
                     + (f", LM loss {_fmt(d['loss_exact'])} &rarr; {_fmt(d['loss_approx'])}" if "loss_exact" in d else "")
                     + ".</p>")
    tr = sec.get("train")
    if tr:
        rows = [[r["label"], r["budget"], r["heldout_loss"], r["heldout_loss_exact_attention"], r["seconds"]] for r in tr["runs"]]
        parts.append(f"<h3>Training with reconstructed attention ({_fmt(tr.get('task'))})</h3>")
        parts.append(_table(["method", "budget", "held-out loss", "same model, exact attention", "seconds"], rows))
    for png in sec.get("plots") or []:
        if run.file(png).exists():
            parts.append(figure(png, _caption(png, sec)))
    return "\n".join(parts)


def _caption(png: str, sec: dict) -> str:
    """What a reconstruct plot shows, by file name."""
    target = sec.get("target_tv", 0.05)
    if png == "reconstruct_tv_table.png":
        return (f"Softmax TV per method (rows) and layer (columns, real indices) at {sec.get('budget_pairs')} exact "
                f"pairs per row on held-out windows; darker = worse. Target: TV &lt; {target:g} in every layer.")
    if png.startswith("reconstruct_sweep_"):
        lab = png[len("reconstruct_sweep_"):-4]
        return (f"Budget sweep for {escape(lab)}: mean softmax TV per layer against the fraction of exact pairs per "
                f"row; the dashed line is the target TV {target:g}.")
    if png == "reconstruct_train.png":
        return "Training a small LM with reconstructed attention: training loss per step for each method and budget."
    return escape(png)
