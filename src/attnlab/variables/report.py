"""HTML fragment for the ``variables`` section of a run directory (embedded by the report module)."""

from __future__ import annotations

import math
from html import escape
from typing import Any, Mapping

from ..io import RunDir
from ..report.html import cell as _fmt, figure, table as _table
from ..textfmt import interval
from .experiment import SECTION
from .plots import verdict_line


def _ci(ci: Any, n: int | None = None) -> str:
    """[lo, hi] rounded, a None or infinite end as 'unbounded'; no interval for one seed (``n == 1``)."""
    if not ci:
        return ""
    return interval([-math.inf if ci[0] is None else float(ci[0]), math.inf if ci[1] is None else float(ci[1])], n)


def _fit_cell(r: Mapping[str, Any]) -> str:
    """Fit rate of a T's trials, the sizes m where some trial did not fit (fit/tried), and the restarts."""
    bad = [f"m={f['m']}: {f['fit']}/{f['n']}" for f in r.get("fit", []) if f["fit"] < f["n"]]
    rs = r.get("restarts") or {}
    txt = f"{_fmt(r.get('fit_rate', 1.0))}" + (f" (not all fit at {', '.join(bad)})" if bad else " (all fit)")
    return txt + (f"; restarted {rs['restarted']}/{rs['trials']}, at most {rs['max_restarts']}" if rs else "")


def _results_table(results: list[Mapping[str, Any]]) -> str:
    """m*(T) rows: median, CI, per seed, fit rate and restarts, flags, trials, the largest norms reached."""
    rows = [[r["T"], r["m_star"] if r["m_star"] is not None else f"not learned up to m = {r.get('m_max')}",
             _ci(r.get("ci"), len(r.get("per_seed") or {}) or None),
             ", ".join(f"{k}: {_fmt(v)}" for k, v in r.get("per_seed", {}).items()), _fit_cell(r), r.get("flag") or "",
             r.get("n_trials"),
             ", ".join(f"{k} {v:.3g}" for k, v in r.get("norms_max", {}).items()), r.get("seconds")]
            for r in results]
    return _table(["T", "m* (median over seeds, fitting trials only)", "95% CI", "per seed m*",
                   "fit rate (train acc >= fit criterion)", "flag", "trials",
                   "largest norm over trials", "seconds"], rows)


def _fits_html(target: Mapping[str, Any], name: str) -> str:
    """Fit table and the verdict sentence (or why there is no fit)."""
    fits = target.get("fits")
    if not fits:
        return f"<p>{escape(name)}: no law fit: {escape(str(target.get('fit_error') or 'no points'))}</p>"
    lf, pf = fits["log"], fits["power"]
    rows = [["a + b log T", ", ".join(f"{k}={v:.4g} {_ci(lf['ci'].get(k))}" for k, v in lf["params"].items()),
             f"{lf['r2']:.3f} {_ci(lf['ci'].get('r2'))}", lf["aic"]],
            ["a + b T^c", ", ".join(f"{k}={v:.4g}" + (f" {_ci(pf['ci'].get(k))}" if k in pf["ci"] else "")
                                    for k, v in pf["params"].items()), f"{pf['r2']:.3f}", pf["aic"]]]
    how = "bootstrap over seeds" if fits.get("method") == "bootstrap" else "least-squares t intervals"
    return (f"<h4>{escape(name)}: law fits ({fits['n_points']} points, {how})</h4>"
            + _table(["law", "parameters (95% CI)", "R^2 (CI)", "AICc"], rows)
            + f"<p>Verdict: <b>{escape(fits['verdict'])}</b> - {escape(fits.get('reason', ''))}.</p>")


def _mass_vs_T(sec: Mapping[str, Any]) -> str:
    """Readout mass on the relevant positions at m* per T (recorded by every bounded trial)."""
    rows = [[r["T"], r["m_star"], f"{r['attn']['mass_median']:.3f}",
             f"[{r['attn']['mass_min']:.3f}, {r['attn']['mass_max']:.3f}]", _fmt(r["attn"].get("topk_median")),
             f"{(sec.get('config', {}).get('s') or 0) / (r['T'] + 1):.4f}"]
            for r in sec.get("results", []) if r.get("attn")]
    if not rows:
        return ""
    return ("<h3>Attention on the relevant positions against T (each seed's trial at its m*)</h3>"
            + _table(["T", "m*", "mass (median over seeds)", "range over seeds", "top-s precision", "uniform"], rows))


def _probe_bounds_html(pb: Any) -> str:
    """The probe against the norm bound: mass, its cap, accuracy and fit per qk bound."""
    if not pb or not pb.get("results"):
        return ""
    rows = [[r["qk_bound"], f"{r['mass_median']:.3f}", f"[{r['mass_min']:.3f}, {r['mass_max']:.3f}]",
             f"{r['cap']:.3f}", _fmt(r.get("topk_median")), f"{r['test_acc_median']:.3f}",
             f"{r['learned']}/{r['n']}", _fmt(r["fit_rate"]), _fmt(r.get("norm_qk_median"))] for r in pb["results"]]
    return (f"<h3>Attention probe against the norm bound (T = {pb['T']}, m = {pb['m']}, every seed)</h3>"
            + _table(["qk bound", "mass on relevant (median)", "range over seeds", "cap of the bound",
                      "top-s precision", "test acc (median)", "learned", "fit rate", "||W_Q^T W_K||_F reached"], rows)
            + f"<p>The cap is s / (s + (T + 1 - s) e^(-2L)) with L = 4 emb^2 qk / sqrt(d_head) (emb bound "
              f"{_fmt(pb.get('emb_bound'))}, d_head {pb.get('d_head')}): a tighter bound can only spread attention. "
              f"Uniform attention gives {pb['uniform_mass']:.4f}.</p>")


def render_section(run: RunDir) -> str:
    """The variables section as an HTML fragment: m*(T) tables, fits, norms, trade-off, probe, and PNGs."""
    sec = run.section(SECTION)
    if not sec:
        return "<p>No variables results in this run.</p>"
    cfg = sec.get("config", {})
    search = cfg.get("search", {})
    model = sec.get("model", cfg.get("model", "transformer"))
    parts = [
        f"<p>Task <b>{_fmt(cfg.get('task'))}</b>, s = {_fmt(cfg.get('s'))}, {_fmt(cfg.get('seeds'))} seeds; "
        f"m*_s per seed = smallest train size from which every larger tried size reaches "
        f"{_fmt(search.get('threshold'))} test accuracy, counting only trials that fit their training set "
        f"(accuracy on all m training examples &ge; {_fmt((cfg.get('bounded') or {}).get('fit_acc', 1.0))}; a trial "
        f"that does not is re-initialised up to {_fmt((cfg.get('bounded') or {}).get('restarts'))} times, each "
        f"attempt with the same step budget, learning rates {_fmt((cfg.get('bounded') or {}).get('lr_grid') or [(cfg.get('bounded') or {}).get('lr')])} "
        f"chosen on training data only); m*(T) = median over seeds with a bootstrap 95% CI. "
        f"Device {_fmt(sec.get('device'))}, wall {_fmt(sec.get('wall_s'))} s.</p>",
    ]
    parts.append(_model_html(cfg, model))
    parts.append(_results_table(sec.get("results", [])))
    if sec.get("skipped_T"):
        skipped = ", ".join(f"{d['learner']} T={d['T']}" if isinstance(d, dict) else str(d) for d in sec["skipped_T"])
        parts.append(f"<p>Skipped (time budget): {escape(skipped)}.</p>")
    parts.append(_fits_html(sec, str(model)))
    con = sec.get("contrast")
    if con and con.get("results"):
        parts.append(f"<h3>Contrast learner: {escape(con['model'])} on the flattened bits (SGD)</h3>")
        parts.append(_results_table(con["results"]))
        parts.append(_fits_html(con, con["model"]))
    parts += _norm_sweep_and_probe(sec)
    parts.append(_mass_vs_T(sec))
    parts.append(_probe_bounds_html(sec.get("probe_bounds")))
    fits_caption = "; ".join(verdict_line(n, t) for n, t in ((str(model), sec), (str((con or {}).get("model")), con))
                             if t and t.get("results"))
    captions = {
        "variables_mstar.png": "Smallest training-set size m* reaching the accuracy threshold against context length "
                               "T (log-x axes; left the bounded head, right the contrast): per-seed points, the median "
                               "with its bootstrap 95% interval, the log fit (dashed) and the power fit (dotted). "
                               f"Fits and verdicts: {escape(fits_caption)}.",
        "variables_probe.png": "Readout attention mass on the s relevant positions: against T for each seed at its "
                               "m* (with the cap the norm bounds put on it and uniform attention), and against the "
                               "bound on ||W_Q^T W_K||_F at fixed T and m.",
        "variables_norm_sweep.png": "Norm / sample trade-off: m* against the bound on ||W_Q^T W_K||_F.",
    }
    for png in sec.get("plots", []):
        if run.file(png).exists():
            parts.append(figure(png, captions.get(png, escape(png))))
    return "\n".join(parts)


def _model_html(cfg: dict, model: Any) -> str:
    """The paragraph describing the model: the bounded-norm head and its bounds, or the SmallTransformer."""
    if model != "bounded":
        return f"<p>Model: {escape(str(model))} (SmallTransformer; norms only as set by --norm-mode).</p>"
    b = (cfg.get("bounded") or {}).get("bounds") or {}
    return ("<p>Model: the <b>bounded-norm attention head</b> (the class of the log T bound): one layer, CLS "
            "readout, no biases, LayerNorm, MLP or residual; after every step the norms are projected onto "
            f"||E_tok[i]||, ||E_pos[t]|| &le; {_fmt(b.get('emb'))}, ||W_Q^h^T W_K^h||_F &le; {_fmt(b.get('qk'))}, "
            f"||W_V||_F &le; {_fmt(b.get('v'))}, ||W_c||_F &le; {_fmt(b.get('out'))}. The last table column "
            "shows the largest norm any trained model ended with.</p>")


def _norm_sweep_and_probe(sec: dict) -> list[str]:
    """The norm / sample trade-off table and the attention probe (readout mass on the relevant positions)."""
    parts: list[str] = []
    ns = sec.get("norm_sweep")
    if ns and ns.get("results"):
        parts.append(f"<h3>Norm / sample trade-off at T = {ns['T']} (bound on ||W_Q^T W_K||_F)</h3>")
        rows = [[r["qk_bound"], r["m_star"] if r["m_star"] is not None else f"not learned up to m = {r['m_max']}",
                 _ci(r.get("ci"), len(r["per_seed"]) or None),
                 ", ".join(f"{k}: {_fmt(v)}" for k, v in r["per_seed"].items()), r.get("flag") or ""]
                for r in ns["results"]]
        parts.append(_table(["qk bound", "m*", "95% CI", "per seed", "flag"], rows))
    probe = sec.get("probe")
    if probe:
        parts.append(f"<h3>Attention probe (T = {probe['T']}, each seed at its m*)</h3>")
        prow = [[k, p["m"], p.get("test_acc"), _fmt(p["mass"]), _fmt(p["topk_precision"])]
                for k, p in probe["per_seed"].items()]
        parts.append(_table(["seed", "m", "test acc", "readout mass on relevant (mean over heads)", "top-s precision"],
                            prow))
        cap = f"; the norm bounds allow at most {probe['cap']:.3f}" if probe.get("cap") is not None else ""
        parts.append(f"<p>Median mass on the {probe['s']} relevant positions: <b>{probe['mass_median']:.3f}</b> "
                     f"(uniform attention would give {probe['uniform_mass']:.4f}{cap}).</p>")
    return parts
