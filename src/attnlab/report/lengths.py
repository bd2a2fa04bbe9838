"""Rank needed against length: the pooled row-spectrum k90 at a few window lengths (section ``rank_vs_length``).

Each length is a full ``spectrum`` run in ``RUN/lengths/N{len}`` (same model, corpus split and number of
windows); the section keeps per length the pooled k90/k95/k99 and the k90 of each half of the windows (its
spread across windows).
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any, Sequence

from ..io import RunDir

SECTION = "rank_vs_length"


def rank_vs_length(out: str | Path, lengths: Sequence[int], n_sequences: int, model: str = "minilm",
                   progress: bool = True, **settings: Any) -> dict[str, Any]:
    """Run the spectrum at every length of ``lengths`` and write section ``rank_vs_length`` of ``out``."""
    from ..spectral.run import spectrum

    run = RunDir(out)
    points = []
    for n in sorted(set(int(x) for x in lengths)):
        res = spectrum(run.file("lengths") / f"N{n}", model=model, n_sequences=n_sequences, seq_len=n,
                       sketch_size=0, progress=progress, **settings)
        halves = ((res.get("noise_floor") or {}).get("k90_halves") or {}).get("pooled")
        points.append({"seq_len": n, "n_windows": res["n_sequences"],
                       **{k: res["pooled"][k] for k in ("k90", "k95", "k99")}, "k90_halves": halves,
                       **_interval(res)})
    main = run.section("spectrum") or {}  # the run's own spectrum is the sweep's point at its length
    if main.get("seq_len") and main["seq_len"] not in {p["seq_len"] for p in points} and \
            main.get("n_sequences") == n_sequences:
        points.append({"seq_len": main["seq_len"], "n_windows": main["n_sequences"],
                       **{k: main["pooled"][k] for k in ("k90", "k95", "k99")},
                       "k90_halves": ((main.get("noise_floor") or {}).get("k90_halves") or {}).get("pooled"),
                       **_interval(main)})
    sec = {"model": model, "n_sequences": n_sequences, "points": sorted(points, key=lambda p: p["seq_len"]),
           "settings": dict(settings)}
    run.write_section(SECTION, sec)
    return sec


def _interval(res: dict[str, Any]) -> dict[str, Any]:
    """{'k90_interval': [lo, hi]} of a spectrum run's pooled k90 over windows ({} when it has none)."""
    ci = ((res.get("rank_interval") or {}).get("pooled") or {}).get("k90")
    return {"k90_interval": ci} if ci else {}


def render_section(run: RunDir) -> str:
    """A table of k90/k95/k99 per length and the k90 fraction of N."""
    from .html import table

    sec = run.section(SECTION) or {}
    pts = sec.get("points", [])
    ci = any(p.get("k90_interval") for p in pts)
    rows = [[p["seq_len"], p["n_windows"], p["k90"]] + ([_text(p.get("k90_interval"))] if ci else [])
            + [p["k90"] / p["seq_len"], ", ".join(str(x) for x in p["k90_halves"]) if p.get("k90_halves") else None,
               p["k95"], p["k99"]] for p in pts]
    if not rows:
        return ""
    header = ["N", "windows", "k90 (pooled)"] + (["95% interval over windows"] if ci else []) + \
        ["k90 / N", "k90 of each half", "k95", "k99"]
    return table(header, rows, float_fmt="{:.2f}",
                 caption=f"Eigenvectors needed for 90/95/99% of score-row variance (all heads pooled, "
                         f"{html.escape(str(sec.get('model')))}), per window length. The halves' k90 shows the spread "
                         "across windows (each half has half the rows, so it reads lower)"
                         + ("; the interval (jackknife over groups of windows) is the sampling spread at this number "
                            "of windows, not that growth." if ci else "."))


def _text(ci: Sequence[int] | None) -> str | None:
    return f"[{ci[0]}, {ci[1]}]" if ci else None
