"""The report's speed section: one table per imported GPU result (data in :mod:`attnlab.report.speed`)."""

from __future__ import annotations

import html

from ..io import RunDir
from .speed import CPU_NOTE, SECTION


def render_section(run: RunDir) -> str:
    """One table per imported source, each naming the card that measured it."""
    from .html import table

    sec = run.section(SECTION) or {}
    out = []
    for s in sec.get("sources", []):
        label = (f"measured on {html.escape(s['device'])}" if s.get("gpu") else
                 f"measured on {html.escape(s['device'])}: <b>timings not meaningful</b> ({CPU_NOTE})")
        rows = [[r["what"], r["N"], r["method"], r["target"], r["baseline"], r["attention_x"], r["forward_x"],
                 r["attention_x_all_sparse"], r["quality"]] for r in s["rows"]]
        out.append(f"<h3>{html.escape(s['file'])} ({html.escape(s['kind'])})</h3><p class='note'>{label}"
                   + (" (partial file: the run stopped early)" if s.get("partial") else "") + ".</p>")
        out.append(table(["what", "N", "method", "target", "baseline", "attention x (as run)", "forward x",
                          "attention x (all layers sparse)", "quality"], rows, float_fmt="{:.2f}",
                         caption="Speed-up = baseline time / sparse time; prediction and mask building included."))
    return "".join(out)
