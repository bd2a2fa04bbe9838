"""The report's opening summary: one line of takeaway per pillar, with key numbers and their spread.

Everything comes from results.json. A spread is named for what it is (across heads, layers, seeds or
windows); where a section stores a confidence interval it is quoted instead.
"""

from __future__ import annotations

import html
import statistics
from typing import Any, Callable, Optional, Sequence


def _f(x: Optional[float], nd: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{nd}g}" if abs(x) >= 10 ** nd else f"{x:.{nd}f}"


def _spread(xs: Sequence[float]) -> tuple[float, float, float, float]:
    """(mean, sd, min, max) of the finite values."""
    v = [float(x) for x in xs if x is not None and x == x]
    if not v:
        return (float("nan"),) * 4
    return statistics.fmean(v), statistics.stdev(v) if len(v) > 1 else 0.0, min(v), max(v)


def _spectrum(res: dict[str, Any]) -> str:
    n = res["seq_len"]
    p = res["pooled"]
    ks = [v["k90"] for v in res.get("per_head", {}).values()]
    med = statistics.median(ks) if ks else None
    lay = [res["per_layer"][str(l)]["k90"] for l in res["layers"]]
    line = (f"<b>Spectrum</b> ({html.escape(str(res.get('model', {}).get('name')))}, {res['n_sequences']} windows of "
            f"{n} tokens): {p['k90']} of {n} eigenvectors explain 90% of score-row variance (all heads pooled); "
            f"per head k90 median {med:g}, range {min(ks)}&ndash;{max(ks)} over {len(ks)} heads; per layer "
            f"{min(lay)}&ndash;{max(lay)}.")
    ci = p.get("k90_ci")
    if ci:
        line += f" Pooled k90 interval across windows: [{ci[0]}, {ci[1]}]."
    frac = p["k90"] / n
    line += (" Rows are <i>not</i> low-rank at this length (k90 above half of N)." if frac > 0.5 else
             f" Rows are low-rank: {100 * frac:.0f}% of N suffices.")
    return line


def _compare(res: dict[str, Any]) -> str:
    ov = res["overlap"]
    diag = [ov[i][i] for i in range(min(len(ov), len(ov[0])))]
    m, sd, lo, hi = _spread(diag)
    a, b = res.get("label_a") or res.get("model_a"), res.get("label_b") or res.get("model_b")
    line = (f"<b>Cross-run overlap</b> {html.escape(str(a))} vs {html.escape(str(b))}: same-layer eigenspace overlap "
            f"{_f(m)} &plusmn; {_f(sd)} (sd across {len(diag)} layers, range {_f(lo)}&ndash;{_f(hi)}); chance "
            f"{_f(res['chance'])}")
    nf = res.get("noise_floor")
    if nf:
        nm, nsd, _, _ = _spread(nf.get("diagonal", []))
        line += f", noise floor (two halves of one corpus) {_f(nm)} &plusmn; {_f(nsd)}"
    return line + "."


def _reconstruct(res: dict[str, Any]) -> str:
    table = res.get("table") or {}
    if not table:
        return "<b>Reconstruction</b>: training comparison only (see section)."
    best = res["best"]
    per_layer = [v["tv"] for v in table[best]["per_layer"].values()]
    m, sd, lo, hi = _spread(per_layer)
    worst = res.get("best_worst_layer_tv", hi)
    target = res.get("target_tv", 0.05)
    met = "meets" if worst < target else "does <b>not</b> meet"
    line = (f"<b>Reconstruction</b>: from {res['budget_pairs']} exact pairs per row ({100 * res['budget_fraction']:.0f}% of "
            f"keys), the best of {len(table)} methods, <b>{html.escape(best)}</b>, reaches softmax TV {_f(m)} &plusmn; "
            f"{_f(sd)} (sd across {len(per_layer)} layers; worst layer {_f(worst)}) on {res.get('n_eval')} held-out "
            f"windows, which {met} the target TV &lt; {target:g}.")
    for d in res.get("dropin") or []:
        if d.get("method") == best:
            line += f" As drop-in attention: sentence-embedding cosine {_f(d['sentence_cosine'], 4)}."
    return line


def _sparsity(res: dict[str, Any]) -> str:
    r9 = {k: v for k, v in (res.get("recall_at_0.9") or {}).items() if v is not None}
    gold = res.get("gold", {})
    line = f"<b>Sparsity</b>: gold entmax graphs are {_f(gold.get('sparsity'))} sparse"
    if not r9:
        return line + "; no method reached sparsity 0.9 on its Pareto front."
    bounds = {k: v for k, v in r9.items() if k.startswith("oracle")}
    preds = {k: v for k, v in r9.items() if k not in bounds} or r9
    best = max(preds, key=preds.get)
    line += (f"; at sparsity 0.9 the highest-recall predictor, <b>{html.escape(best)}</b>, recalls {_f(r9[best])} of gold edges")
    op = (res.get("operating_points_0.9") or {}).get(best)
    pts = res.get("methods", {}).get(best, {}).get("points", [])
    pt = next((p for p in pts if op and p["knob"] == op["knob"]), None)
    if pt and pt.get("grid", {}).get("recall"):
        flat = [x for row in pt["grid"]["recall"] for x in row]
        _, sd, lo, hi = _spread(flat)
        line += (f" (at its nearest operating point, sparsity {_f(op['sparsity'])}: per-head recall sd {_f(sd)}, "
                 f"range {_f(lo)}&ndash;{_f(hi)} over {len(flat)} heads)")
    others = sorted(((v, k) for k, v in preds.items() if k != best), reverse=True)[:2]
    if others:
        line += "; next: " + ", ".join(f"{html.escape(k)} {_f(v)}" for v, k in others)
        if pt and pt.get("grid", {}).get("recall"):
            se = sd / len(flat) ** 0.5  # heads as samples: a rough standard error of the mean recall
            if r9[best] - others[0][0] < 2 * se:
                line += (f" &mdash; within 2 standard errors of the best ({_f(2 * se)}), so <b>no clear winner</b> "
                         "at this sample size")
    if bounds:
        line += "; oracle bound: " + ", ".join(f"{html.escape(k)} {_f(v)}" for k, v in bounds.items())
    line += f"; {len(res.get('methods', {}))} methods on {res.get('config', {}).get('n_eval')} held-out windows."
    return line


def _variables(res: dict[str, Any]) -> str:
    cfg = res.get("config", {})
    done = [r for r in res.get("results", []) if r.get("m_star") is not None]
    line = f"<b>Variable creation</b> (task {html.escape(str(cfg.get('task')))}, s = {cfg.get('s')}, {cfg.get('seeds')} seed(s)): "
    if not done:
        return line + "no context length reached the accuracy threshold."
    def one(r: dict) -> str:
        ci = r.get("ci")
        return f"{r['m_star']} at T={r['T']}" + (f" (95% CI {ci[0]:g}&ndash;{ci[1]:g})" if ci and None not in ci else "")

    line += "m*(T) = " + ", ".join(one(r) for r in done)
    if not res.get("fits") and res.get("fit_error"):
        line += f"; no law fitted: {html.escape(str(res['fit_error']))}"
    fits = res.get("fits")
    verdict = res.get("verdict") or (fits or {}).get("verdict")
    if verdict:
        line += f"; law: {html.escape(str(verdict))}" + (f" ({html.escape(str(fits['reason']))})"
                                                         if fits and fits.get("reason") else "")
    elif fits:
        d = fits.get("delta_aic", 0.0)
        strong = d >= 2 and fits.get("n_points", 0) >= 5 and (cfg.get("seeds") or 1) >= 3
        line += (f"; lower AICc: {html.escape(fits['best'])} (&Delta;AICc {d:.2f}, {fits.get('n_points')} points)"
                 + ("" if strong else " &mdash; inconclusive (needs &Delta;AICc &ge; 2, &ge; 5 lengths and &ge; 3 seeds)"))
    return line + "."


PILLARS: list[tuple[str, Callable[[dict[str, Any]], str]]] = [
    ("spectrum", _spectrum), ("compare", _compare), ("reconstruct", _reconstruct), ("sparsity", _sparsity),
    ("variables", _variables)]


def summary_lines(results: dict[str, Any]) -> list[str]:
    """One HTML line per pillar present in ``results``."""
    out = []
    for key, fn in PILLARS:
        if results.get(key):
            try:
                out.append(fn(results[key]))
            except (KeyError, TypeError, ValueError, ZeroDivisionError) as e:
                out.append(f"<b>{key}</b>: summary unavailable ({html.escape(repr(e))}); see its section.")
    return out


def summary_html(results: dict[str, Any]) -> str:
    """The summary box at the top of the report."""
    lines = summary_lines(results)
    if not lines:
        return ""
    items = "".join(f"<li>{x}</li>" for x in lines)
    return f'<div class="summary" id="summary"><b>Summary</b><ul>{items}</ul></div>'
