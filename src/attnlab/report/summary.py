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


def _x(c: Optional[float]) -> str:
    """A total compute in units of dense QK^T: '3.06x' (two decimals, three below 0.1)."""
    return "n/a" if c is None else f"{c:.3f}x" if c < 0.1 else f"{c:.2f}x"


def _spread(xs: Sequence[float]) -> tuple[float, float, float, float]:
    """(mean, sd, min, max) of the finite values."""
    v = [float(x) for x in xs if x is not None and x == x]
    if not v:
        return (float("nan"),) * 4
    return statistics.fmean(v), statistics.stdev(v) if len(v) > 1 else 0.0, min(v), max(v)


def _mean_sd(xs: Sequence[float], across: str) -> str:
    """'m &plusmn; sd (sd across n layers, range lo&ndash;hi)'; a single value alone, with no spread shown."""
    m, sd, lo, hi = _spread(xs)
    n = len([x for x in xs if x is not None and x == x])
    if n <= 1:
        return f"{_f(m)} (one {across[:-1] if across.endswith('s') else across}: no spread)"
    return f"{_f(m)} &plusmn; {_f(sd)} (sd across {n} {across}, range {_f(lo)}&ndash;{_f(hi)})"


def _halves(ci: Optional[Sequence[int]]) -> str:
    """' (k90 of each half of the windows: a, b)' when both halves were measured, else ''."""
    if not ci or len(ci) != 2 or None in ci:
        return ""
    return f" (each half of the windows: {ci[0]} and {ci[1]}; k90 grows with the number of windows)"


def _window_ci(res: dict[str, Any]) -> str:
    """'; 95% interval over windows [a, b]' of the pooled k90 when the run has it, else ''."""
    from ..spectral.spread import interval_of

    sp = res.get("rank_interval")
    ci = interval_of(sp, "k90")
    return f"; {round(100 * sp['confidence'])}% interval over windows {ci}" if ci else ""


def _spectrum(res: dict[str, Any]) -> str:
    n = res["seq_len"]
    p = res["pooled"]
    ks = [v["k90"] for v in res.get("per_head", {}).values()]
    med = statistics.median(ks) if ks else None
    lay = [res["per_layer"][str(l)]["k90"] for l in res["layers"]]
    line = (f"<b>Spectrum</b> ({html.escape(str(res.get('model', {}).get('name')))}, {res['n_sequences']} windows of "
            f"{n} tokens): {p['k90']} of {n} eigenvectors explain 90% of score-row variance (all heads pooled"
            f"{_window_ci(res)})"
            f"{_halves(((res.get('noise_floor') or {}).get('k90_halves') or {}).get('pooled'))}; "
            f"per head k90 median {med:g}, range {min(ks)}&ndash;{max(ks)} over {len(ks)} heads; per layer "
            f"{min(lay)}&ndash;{max(lay)}.")
    frac = p["k90"] / n
    line += (" Rows are <i>not</i> low-rank at this length (k90 above half of N)." if frac > 0.5 else
             f" Rows are low-rank: {100 * frac:.0f}% of N suffices.")
    return line


def _rank_vs_length(res: dict[str, Any]) -> str:
    pts = sorted(res.get("points", []), key=lambda r: r["seq_len"])
    if not pts:
        return "<b>Rank vs length</b>: no lengths measured."
    body = ", ".join(f"N = {r['seq_len']}: {r['k90']} ({100 * r['k90'] / r['seq_len']:.0f}%)"
                     + (f" [95% interval over windows [{r['k90_interval'][0]}, {r['k90_interval'][1]}]]"
                        if r.get("k90_interval") else "")
                     + (f" [halves {r['k90_halves'][0]}, {r['k90_halves'][1]}]" if r.get("k90_halves") else "")
                     for r in pts)
    line = f"<b>Rank needed vs length</b> (pooled k90, {res.get('n_sequences')} windows each): {body}"
    if len(pts) >= 2:
        a, b = pts[0], pts[-1]
        fa, fb = a["k90"] / a["seq_len"], b["k90"] / b["seq_len"]
        grow = (b["k90"] / max(a["k90"], 1)) / (b["seq_len"] / a["seq_len"])
        verdict = ("grows about in proportion to N: the rows do not get relatively lower-rank with length"
                   if fb >= 0.8 * fa else "grows more slowly than N: longer rows are relatively lower-rank")
        line += f"; from N = {a['seq_len']} to {b['seq_len']} the rank {verdict} (x{grow:.2f} of proportional)"
    return line + "."


def _compare(res: dict[str, Any]) -> str:
    ov = res["overlap"]
    diag = [ov[i][i] for i in range(min(len(ov), len(ov[0])))]
    a, b = res.get("label_a") or res.get("model_a"), res.get("label_b") or res.get("model_b")
    line = (f"<b>Cross-run overlap</b> {html.escape(str(a))} vs {html.escape(str(b))}: same-layer eigenspace overlap "
            f"{_mean_sd(diag, 'layers')}; chance {_f(res['chance'])}")
    nf = res.get("noise_floor")
    if nf:
        line += f", noise floor (two halves of one corpus) {_mean_sd(nf.get('diagonal', []), 'layers')}"
    return line + "."


def method_counts(res: dict) -> dict[str, int]:
    """How many methods a reconstruct section holds: rows of its table, of which oracle bounds, and frontier points."""
    table = res.get("table") or {}
    return {"table": len(table), "oracle": sum(v.get("selection") == "oracle" for v in table.values()),
            "frontier": len(res.get("frontier_points") or {})}


def methods_text(res: dict) -> str:
    """The one wording of the method count, shared by the CLI and the report: '20 methods (4 of them oracle
    bounds) + 12 frontier points' (the table's rows, then the frontier's points when there are any)."""
    c = method_counts(res)
    text = f"{c['table']} method{'s' * (c['table'] != 1)}"
    if c["oracle"]:
        text += f" ({c['oracle']} of them oracle bound{'s' * (c['oracle'] != 1)})"
    if c["frontier"]:
        text += f" + {c['frontier']} frontier point{'s' * (c['frontier'] != 1)}"
    return text


def methods_by_cost(res: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Every evaluated method (table and frontier; oracle selections excluded): total compute and worst-layer TV."""
    pool = {k: {"compute": v["cost"]["compute"], "tv": max(x["tv"] for x in v["per_layer"].values())}
            for k, v in (res.get("table") or {}).items() if v.get("selection") != "oracle" and "cost" in v}
    pool.update({k: {"compute": v["compute"], "tv": v["worst_layer_tv_pooled"]}
                 for k, v in (res.get("frontier_points") or {}).items()})
    return pool


def _best_layers(res: dict[str, Any]) -> list[float]:
    best = res["best"]
    if best in (res.get("table") or {}):
        return [v["tv"] for v in res["table"][best]["per_layer"].values()]
    return list(res["frontier_points"][best]["per_layer_tv"].values())


def _reconstruct(res: dict[str, Any]) -> str:
    if not res.get("table") and not res.get("frontier_points"):
        return "<b>Reconstruction</b>: training comparison only (see section)."
    best, target = res["best"], res.get("target_tv", 0.05)
    per_layer = _best_layers(res)
    hi = _spread(per_layer)[3]
    worst = res.get("best_worst_layer_tv", hi)
    comp = res.get("best_compute")
    pool = methods_by_cost(res)
    chosen = html.escape(str(res.get("best_chosen_at") or f"pair budget {res.get('budget_pairs')}"))
    line = (f"<b>Reconstruction</b>: the best (oracle bounds excluded) of {methods_text(res)} at {chosen}, "
            f"<b>{html.escape(best)}</b>, costs "
            f"<b>{_x(comp)} dense</b> total compute and reaches worst-layer softmax TV <b>{_f(worst)}</b> on "
            f"{res.get('n_eval')} held-out windows; per-layer TV {_mean_sd(per_layer, 'layers')}")
    if comp is not None and comp >= 1.0:
        line += " &mdash; more than computing attention densely, so it saves nothing"
    line += ". "
    ok = {k: v for k, v in pool.items() if v["tv"] < target}
    cheap = {k: v for k, v in ok.items() if v["compute"] < 1.0}
    if cheap:
        k = min(cheap, key=lambda k: cheap[k]["compute"])
        line += (f"Beats dense at the target TV &lt; {target:g}: <b>{html.escape(k)}</b> at {_x(cheap[k]['compute'])} "
                 f"dense (TV {_f(cheap[k]['tv'])}).")
    elif ok:
        k = min(ok, key=lambda k: ok[k]["compute"])
        line += (f"<b>Nothing beats dense</b> at the target TV &lt; {target:g}: the cheapest method that meets it, "
                 f"{html.escape(k)}, costs {_x(ok[k]['compute'])} dense.")
    else:
        k = min(pool, key=lambda k: pool[k]["tv"])
        line += (f"<b>No method meets</b> the target TV &lt; {target:g} (lowest worst-layer TV {_f(pool[k]['tv'])}, "
                 f"{html.escape(k)} at {_x(pool[k]['compute'])} dense).")
    for d in res.get("dropin") or []:
        if d.get("method") == best:
            scope = (f" (heads {', '.join(map(str, d['heads']))} only; the other heads kept exact attention)"
                     if d.get("exact_heads") else "")
            line += f" As drop-in attention{scope}: sentence-embedding cosine {_f(d['sentence_cosine'], 4)}."
    return line


def _recall_ci(res: dict[str, Any], method: str) -> str:
    """' &plusmn; h (95% CI over n windows)' from the method's per-window recall at the operating point."""
    w = ((res.get("methods", {}).get(method) or {}).get("windows_at_0.9") or {}).get("recall") or {}
    if (w.get("n") or 0) < 2 or w.get("ci95") is None:
        return ""
    return f" &plusmn; {_f(w['ci95'])} (95% CI over {w['n']} windows)"


def _sparsity(res: dict[str, Any]) -> str:
    r9 = {k: v for k, v in (res.get("recall_at_0.9") or {}).items() if v is not None}
    gold = res.get("gold", {})
    src = (res.get("model") or {}).get("gold_graphs_from")
    line = (f"<b>Sparsity</b>: gold entmax graphs{f' ({html.escape(str(src))})' if src else ''} are "
            f"{_f(gold.get('sparsity'))} sparse")
    if gold.get("sparsity") is not None and gold["sparsity"] < 0.9:
        line += (" &mdash; <b>below the 0.9 operating point</b>, so even the oracle cannot keep every gold edge there "
                 "and recall at 0.9 says little")
    if not r9:
        return line + "; no method reached sparsity 0.9 on its Pareto front."
    bounds = {k: v for k, v in r9.items() if k.startswith("oracle")}
    preds = {k: v for k, v in r9.items() if k not in bounds} or r9
    best = max(preds, key=preds.get)
    line += (f"; at sparsity 0.9 the highest-recall predictor, <b>{html.escape(best)}</b>, recalls "
             f"<b>{_f(r9[best])}</b>{_recall_ci(res, best)} of gold edges")
    if bounds:
        line += "; the oracle bound: " + ", ".join(f"{html.escape(k)} <b>{_f(v)}</b>{_recall_ci(res, k)}"
                                                 for k, v in bounds.items())
    others = sorted(((v, k) for k, v in preds.items() if k != best), reverse=True)[:2]
    if others:
        line += "; next: " + ", ".join(f"{html.escape(k)} {_f(v)}" for v, k in others)
        w = ((res.get("methods", {}).get(best) or {}).get("windows_at_0.9") or {}).get("recall") or {}
        if (w.get("n") or 0) >= 2 and w.get("ci95") is not None and r9[best] - others[0][0] < w["ci95"]:
            line += " &mdash; within the best's 95% interval: <b>inconclusive</b> at this sample size"
    mlm = ((res.get("model") or {}).get("finetune") or {}).get("mlm") or {}
    if "entmax_finetuned" in mlm and "entmax_no_finetune" in mlm:
        a, b = mlm["entmax_no_finetune"]["loss"], mlm["entmax_finetuned"]["loss"]
        line += f"; MLM probe loss: swapped {_f(a)}, fine-tuned {_f(b)}" + (
            " (<b>fine-tuning made it worse</b>)" if b > a else "")
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
        shown = ci and None not in ci and (cfg.get("seeds") or 1) > 1 and ci[0] != ci[1]
        return f"{r['m_star']} at T={r['T']}" + (f" (95% CI {ci[0]:g}&ndash;{ci[1]:g})" if shown else "")

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


def _speed(res: Optional[dict[str, Any]]) -> str:
    from .speed import speed_line

    return speed_line(res)


PILLARS: list[tuple[str, Callable[[dict[str, Any]], str]]] = [
    ("spectrum", _spectrum), ("rank_vs_length", _rank_vs_length), ("compare", _compare),
    ("reconstruct", _reconstruct), ("sparsity", _sparsity), ("variables", _variables)]


def summary_lines(results: dict[str, Any]) -> list[str]:
    """One HTML line per pillar present in ``results``, then the bottom line on speed (a labelled CPU note when
    no GPU result was imported) wherever reconstruction or sparsity results are present."""
    out = []
    for key, fn in PILLARS:
        if results.get(key):
            try:
                out.append(fn(results[key]))
            except (KeyError, TypeError, ValueError, ZeroDivisionError) as e:
                out.append(f"<b>{key}</b>: summary unavailable ({html.escape(repr(e))}); see its section.")
    if results.get("speed") or results.get("reconstruct") or results.get("sparsity"):
        out.append(_speed(results.get("speed")))
    return out


def plain(line: str) -> str:
    """A summary line as plain text for the terminal (tags dropped, entities decoded)."""
    import re

    return html.unescape(re.sub(r"<[^>]+>", "", line))


def summary_html(results: dict[str, Any]) -> str:
    """The summary box at the top of the report."""
    lines = summary_lines(results)
    if not lines:
        return ""
    items = "".join(f"<li>{x}</li>" for x in lines)
    return f'<div class="summary" id="summary"><b>Summary</b><ul>{items}</ul></div>'
