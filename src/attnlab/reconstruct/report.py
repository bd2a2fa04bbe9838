"""HTML fragment of the ``reconstruct`` section of a run directory (embedded by the report module)."""

from __future__ import annotations

from html import escape

from ..io import RunDir
from ..report.html import cell as _fmt, figure, table as _table
from ..report.summary import methods_text

SECTION = "reconstruct"


def render_section(run: RunDir) -> str:
    """The reconstruct section: method table (TV per layer), drop-in effect, training runs, and the PNGs."""
    sec = run.section(SECTION)
    if not sec:
        return "<p>No reconstruct results in this run.</p>"
    parts = _method_table(sec) + _frontier_part(sec) + _dropin_part(sec) + _train_part(sec)
    for png in sec.get("plots") or []:
        if run.file(png).exists():
            parts.append(figure(png, _caption(png, sec)))
    return "\n".join(parts)


def _method_table(sec: dict) -> list[str]:
    """The run's summary sentence and the method table (TV per layer, sorted by the worst layer)."""
    parts: list[str] = []
    table = sec.get("table") or {}
    if table:
        layers = sorted(next(iter(table.values()))["per_layer"], key=int)
        bc = sec.get("best_cost") or {}
        parts.append(
            f"<p>Model {_fmt(sec.get('model', {}).get('name'))}, {_fmt(sec.get('budget_pairs'))} exact pairs per row "
            f"({_fmt(sec.get('budget_fraction'))} of keys), {_fmt(sec.get('n_eval'))} held-out windows; statistics fitted "
            f"on the fit split ({_fmt(sec.get('fit', {}).get('n_sequences'))} windows). <b>Total compute</b> counts, in "
            "units of the dense QK^T multiply-adds of the same rows: the exact pairs, the rank-r proxy at the method's "
            "own rank (r/d_head) and its projections (2r/N), the exact row mean (2/N), the selection (top-b: 1/d_head) "
            "and the estimator's arithmetic (shared gains: b(N-b)/(N d_head); per-row gains add a b x b Cholesky per "
            f"row). Best ({_fmt(sec.get('best_chosen_at'))}): <b>{_fmt(sec.get('best'))}</b>, worst-layer TV "
            f"{_fmt(sec.get('best_worst_layer_tv'))} (target {_fmt(sec.get('target_tv'))}) at total compute "
            f"{_fmt(bc.get('compute'))} (its proxy alone: {_fmt(sec.get('proxy_cost_fraction'))}).</p>")
        order = sorted(table, key=lambda k: max(v["tv"] for v in table[k]["per_layer"].values()))
        rows = [[lab] + [table[lab]["per_layer"][l]["tv"] for l in layers] +
                [table[lab]["mean"]["rel_err"], table[lab]["mean"]["top1"], table[lab]["mean"]["kl"],
                 table[lab]["budget_pairs"], (table[lab].get("cost") or {}).get("compute")] for lab in order]
        parts.append(_table(["method"] + [f"TV L{l}" for l in layers] + ["rel. err", "top-1", "KL", "pairs", "total compute"],
                            rows, caption=f"{methods_text({'table': table})}: softmax total variation (TV) per "
                            "layer on held-out windows, sorted by worst layer (click a header to re-sort, hover a "
                            "value for full precision)."))
    return parts


def _frontier_part(sec: dict) -> list[str]:
    """The Pareto points of each frontier family and the best point at each compute budget."""
    parts: list[str] = []
    front = sec.get("frontier") or {}
    if front:
        parts.append("<h3>Quality vs total compute (Pareto points of each family; spread across groups of held-out "
                     "windows)</h3>")
        groups = {k: v.get("n_chunks", 2) for k, v in (sec.get("frontier_points") or {}).items()}  # of windows
        rows = [[p["label"], p["compute"], p["budget_pairs"], p["worst_layer_tv"]["mean"],
                 p["worst_layer_tv"]["std"] if groups.get(p["label"], 2) > 1 else "n/a (1 group)", p["mean_tv"]["mean"]]
                for pts in front.values() for p in pts]
        parts.append(_table(["point", "total compute", "pairs", "worst-layer TV", "sd", "mean TV"], rows,
                            caption=f"The Pareto points of the {len(sec.get('frontier_points') or {})} frontier "
                            "points evaluated."))
        best = sec.get("best_at_compute") or {}
        parts.append("<p>" + "; ".join(f"best at compute &le; {escape(c)}: {_fmt(b)}" for c, b in best.items()) + "</p>")
    return parts


def _dropin_part(sec: dict) -> list[str]:
    """One sentence per drop-in method: output cosines (and the LM loss, when measured)."""
    parts: list[str] = []
    for d in sec.get("dropin") or []:
        scope = (f", heads {_fmt(d['heads'])} (heads {_fmt(d['exact_heads'])} kept exact attention)"
                 if d.get("exact_heads") else "")
        parts.append(f"<p>Drop-in {_fmt(d['method'])} in layers {_fmt(d['layers'])}{scope}: hidden-state cosine "
                     f"{_fmt(d['hidden_cosine'])}, sentence-embedding cosine {_fmt(d['sentence_cosine'])}"
                     + (f", LM loss {_fmt(d['loss_exact'])} &rarr; {_fmt(d['loss_approx'])}" if "loss_exact" in d else "")
                     + ".</p>")
    return parts


def _train_part(sec: dict) -> list[str]:
    """The training comparison: one row per run, and the per-method summary over seeds."""
    parts: list[str] = []
    tr = sec.get("train")
    if tr:
        rows = [[r["label"], r["budget"], r["heldout_loss"], r.get("heldout_loss_exact_attention"), r["seconds"]]
                for r in tr.get("runs", [])]
        parts.append(f"<h3>Training with reconstructed attention ({_fmt(tr.get('task'))})</h3>")
        parts.append(_table(["method", "budget", "held-out loss", "same model, exact attention", "seconds"], rows))
        summ = tr.get("summary") or []
        if summ:
            rows = [[r["objective"], r["label"], r["budget"], r.get("compute"), r["heldout_loss"]["mean"],
                     _sd(r["heldout_loss"]), (r.get("gap_to_full") or {}).get("mean"), _sd(r.get("gap_to_full")),
                     r.get("gap_verdict") or ("n/a (1 seed)" if _one_seed(r) and r["label"] != "full" else "")]
                    for r in summ]
            parts.append(_table(["objective", "method", "budget", "total compute", "held-out loss (mean over seeds)",
                                 "sd", "paired gap to full", "sd", "95% t-interval verdict"], rows,
                                caption="sd and the interval need two seeds or more (--seeds 0,1,2); one seed shows "
                                        "n/a." if any(_one_seed(r) for r in summ) else ""))
    return parts


def _one_seed(row: dict) -> bool:
    return (row.get("heldout_loss") or {}).get("n", 2) <= 1


def _sd(stats: dict | None) -> str | float | None:
    """The sd over seeds, or 'n/a (1 seed)' where there is a single seed (never a spread of 0)."""
    if not stats:
        return None
    return "n/a (1 seed)" if stats.get("n", 2) <= 1 else stats.get("std")


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
