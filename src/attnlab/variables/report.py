"""HTML fragment for the ``variables`` section of a run directory (embedded by the report module)."""

from __future__ import annotations

from html import escape

from ..io import RunDir
from ..report.html import cell as _fmt, figure, table as _table
from .experiment import SECTION


def render_section(run: RunDir) -> str:
    """The variables section as an HTML fragment: m*(T) table, fits, probe, and <img> of the PNGs."""
    sec = run.section(SECTION)
    if not sec:
        return "<p>No variables results in this run.</p>"
    cfg = sec.get("config", {})
    search = cfg.get("search", {})
    parts = [
                f"<p>Task <b>{_fmt(cfg.get('task'))}</b>, s = {_fmt(cfg.get('s'))}, {_fmt(cfg.get('seeds'))} seeds, "
        f"threshold {_fmt(search.get('threshold'))} test accuracy in at least {_fmt(search.get('share'))} of seeds; "
        f"device {_fmt(sec.get('device'))}, wall {_fmt(sec.get('wall_s'))} s.</p>",
    ]
    rows = [[r["T"], r["m_star"], r.get("lower"), ", ".join(f"{k}: {_fmt(v)}" for k, v in r.get("per_seed", {}).items()),
             r.get("n_trials"), r.get("seconds")] for r in sec.get("results", [])]
    parts.append(_table(["T", "m*", "largest failing m", "per seed (smallest m reached)", "trials", "seconds"], rows))
    if sec.get("skipped_T"):
        parts.append(f"<p>Skipped (time budget): T = {_fmt(sec['skipped_T'])}.</p>")
    fits = sec.get("fits")
    if fits:
        frows = [[law, ", ".join(f"{k}={v:.4g}" for k, v in fits[law]["params"].items()), fits[law]["sse"],
                  fits[law]["r2"], fits[law]["aic"]] for law in ("log", "power")]
        parts.append("<h3>Fits</h3>" + _table(["law", "parameters", "SSE", "R^2", "AICc"], frows))
        parts.append(f"<p>Better fit (lower AICc): <b>{escape(fits['best'])}</b> "
                     f"(&Delta;AICc = {fits['delta_aic']:.2f}, {fits['n_points']} points).</p>")
    elif sec.get("fit_error"):
        parts.append(f"<p>Fits skipped: {escape(sec['fit_error'])}</p>")
    probe = sec.get("probe")
    if probe:
        prow = [[f"L{l}H{h}", probe["mass"][l][h], probe["topk_precision"][l][h], probe["support_precision"][l][h],
                 probe["support_recall"][l][h], probe["support_exact"][l][h]]
                for l in range(len(probe["mass"])) for h in range(len(probe["mass"][l]))]
        parts.append(f"<h3>Attention probe (T = {probe['T']}, m = {probe['m']}, test acc {_fmt(probe.get('test_acc'))}, "
                     f"{escape(str(probe.get('attention')))})</h3>")
        parts.append(_table(["head", "mass on relevant", "top-s precision", "support precision", "support recall",
                             "support == relevant"], prow))
    captions = {
        "variables_mstar.png": "Smallest number of training samples m* reaching the accuracy threshold, against context "
                               "length T (log axis). Grey dots: per seed; blue: m*(T) across seeds; dashed / dotted: "
                               "fitted laws a + b log T and a + b T^c.",
        "variables_probe.png": "Readout attention of the trained model per layer and head: attention mass on the "
                               "relevant positions, precision of its top-s keys, and precision of its support.",
    }
    for png in sec.get("plots", []):
        if run.file(png).exists():
            parts.append(figure(png, captions.get(png, escape(png))))
    return "\n".join(parts)
