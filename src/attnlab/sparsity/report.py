"""HTML fragment for the ``sparsity`` section of a run directory (embedded by the report module)."""

from __future__ import annotations

import html

from html import escape

from functools import partial

from ..io import RunDir
from ..report.html import cell, figure, table, toggles
from .run import SECTION

_fmt = partial(cell, float_fmt="{:.3f}")
_table = partial(table, float_fmt="{:.3f}")


def render_section(run: RunDir) -> str:
    """The sparsity section as HTML: summary, recall at sparsity 0.9, Pareto tables, downstream, plots."""
    sec = run.section(SECTION)
    if not sec:
        return "<p>No sparsity results in this run.</p>"
    gold, model = sec.get("gold", {}), sec.get("model", {})
    parts = [f"<p>Model: {_fmt(model.get('kind'))} {_fmt(model.get('name') or model.get('objective'))}; "
             f"{_fmt(gold.get('n_layers'))} layers x {_fmt(gold.get('n_heads'))} heads, d_head {_fmt(gold.get('d_head'))}, "
             f"N = {_fmt(gold.get('seq_len'))}. Gold entmax graph sparsity {_fmt(gold.get('sparsity'))}. "
             "Sparsity = 1 - predicted / valid pairs; recall = predicted gold edges / gold edges; exact = share of "
             "queries with all gold keys predicted; cost = (predicted pairs + predictor cost in dot-product "
             "units, selection included) / valid pairs (lower is better; causal: n(n+1)/2 valid pairs); computation "
             "sparsity = the Sparsefinder authors' 1 - bucket operations / n<sup>2</sup>. Means over heads and layers on held-out windows.</p>"]
    r9 = sec.get("recall_at_0.9", {})
    win = {m: ((sec.get("methods", {}).get(m) or {}).get("windows_at_0.9") or {}).get("recall") or {} for m in r9}
    spread = {m: w if (w.get("n") or 0) >= 2 and w.get("ci95") is not None else {} for m, w in win.items()}
    parts.append("<h3>Recall at sparsity 0.9 (interpolated on the Pareto front)</h3>"
                 + _table(["method", "recall@0.9", "recall at the point nearest 0.9: mean over windows", "± 95% CI",
                           "sd", "windows"],
                          [[m, v, spread[m].get("mean"), spread[m].get("ci95"), spread[m].get("std"), win[m].get("n")]
                           for m, v in r9.items()], collapse=None,
                          caption="The spread is over held-out windows at each method's measured operating point "
                                  "nearest sparsity 0.9 (a dash: fewer than two windows)."))
    caps = {"pareto": "Recall of gold entmax edges against sparsity for every method: dots are operating points, the "
                      "solid line each method's Pareto front; dashed grey: the sparsity-0.9 reference; dotted black: "
                      "the gold graph's own sparsity (an oracle's best point).",
            "cost": "Recall against total cost: (predicted pairs + predictor cost in dot-product units, selection "
                    "included) / valid pairs. Lower cost is better; the dashed line at 1 is the cost of dense attention.",
            "training": "Training loss of the entmax model whose attention graphs are the gold standard."}
    for name, cap in caps.items():
        if sec.get("plots", {}).get(name):
            parts.append(figure(sec["plots"][name], cap))
    from ..report.views import sparsity_figures
    from .run import pareto_table

    parts.append(sparsity_figures(run))
    rows = [[r["method"], r["knob"], r["sparsity"], r["recall"], r["exact"], r["cost"], r["comp_sparsity"],
             r["front"], r["front_cost"]] for r in pareto_table(sec)]
    parts.append("<h3>All operating points</h3><p>Pareto: on the front of (sparsity, recall) over all methods "
                 "(oracle excluded); Pareto (cost): on the front of (cost, recall).</p>"
                 + _table(["method", "knob", "sparsity", "recall", "exact", "cost", "comp. sparsity", "Pareto",
                           "Pareto (cost)"], rows, group_col=0))
    parts += _downstream_part(sec) + _head_grids(sec)
    return "\n".join(parts)


def _downstream_part(sec: dict) -> list[str]:
    """The downstream table (loss / accuracy of a task head, or hidden-state error) or why it was skipped."""
    parts: list[str] = []
    down = sec.get("downstream")
    if down and "skipped" in down:
        parts.append(f"<p class='note'>Downstream: {html.escape(str(down['skipped']))}.</p>")
    elif down:
        base = down.get("full_entmax", {})
        if "loss" in base:
            parts.append(f"<h3>Downstream (attention restricted to predicted graphs)</h3><p>Full entmax: loss "
                         f"{_fmt(base['loss'])}, accuracy {_fmt(base['acc'])}; restricted to the gold graph: loss "
                         f"{_fmt(down['gold_graph']['loss'])}.</p>")
            drows = [[m, r["knob"], r["sparsity"], r["recall"], r["loss"], r["delta_loss"], r["acc"], r["delta_acc"]]
                     for m, rs in down["methods"].items() for r in rs]
            parts.append(_table(["method", "knob", "sparsity", "recall", "loss", "Δ loss", "acc", "Δ acc"], drows,
                                group_col=0))
        else:
            parts.append("<h3>Downstream (final hidden states vs full entmax)</h3>")
            drows = [[m, r["knob"], r["sparsity"], r["recall"], r["rel_error"], r["cosine"]]
                     for m, rs in down["methods"].items() for r in rs]
            parts.append(_table(["method", "knob", "sparsity", "recall", "relative error", "cosine"], drows, group_col=0))
    return parts


def _head_grids(sec: dict) -> list[str]:
    """Per-method grids of recall per layer and head at the operating point closest to sparsity 0.9."""
    parts: list[str] = []
    heads = [v for k, v in sec.get("plots", {}).items() if k.startswith("heads_")]
    if heads:
        parts.append("<h3>Recall per layer and head at the operating point closest to sparsity 0.9</h3>")
        names = {v: k[len("heads_"):] for k, v in sec.get("plots", {}).items() if k.startswith("heads_")}
        ops = sec.get("operating_points_0.9", {})
        parts.append(toggles("sp-heads", list(names.values()), "methods"))
        parts.append('<div id="sp-heads" class="grid">' + "".join(
            figure(h, f"{escape(names[h])}: recall of gold edges per layer (rows) and head (columns) at measured "
                      f"sparsity {ops.get(names[h], {}).get('sparsity', float('nan')):.2f}.", group=names[h])
            for h in heads) + "</div>")
    return parts
