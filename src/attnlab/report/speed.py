"""What skipping attention buys in time: GPU speed results imported into a run directory's report.

``attnlab report RUN FILE.json ...`` reads the JSON written by ``benchmarks/prefill.py``,
``benchmarks/sparse_entmax.py`` or ``attnlab sparsity prefill --out FILE.json`` and stores its rows, with the
card that measured them, in section ``speed`` of RUN/results.json. Results measured on a CPU are kept but
labelled: there sparse attention runs the exact masked path, which checks correctness, not speed.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any, Callable, Optional

from ..errors import ResultsError
from ..io import RunDir

SECTION = "speed"
CPU_NOTE = ("on CPU, sparse attention runs the exact masked path (a correctness path: it computes every score), "
            "so this run measures no speed-up")


def is_gpu(device: Optional[str]) -> bool:
    """A device string that names a GPU (not 'cpu...')."""
    return bool(device) and not str(device).lower().startswith("cpu")


def _prefill_bench(doc: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for r in doc["rows"]:
        base = "cudnn" if "attn_x_cudnn" in r else next((b for b in ("flash", "auto") if f"attn_x_{b}" in r), None)
        if base is None:
            continue
        rows.append({"what": "sparse prefill", "N": r["N"], "method": r["predictor"], "target": f"recall {r['p']:g}",
                     "baseline": base, "attention_x": r.get(f"exec_attn_x_{base}"),
                     "forward_x": r.get(f"exec_fwd_x_{base}"), "attention_x_all_sparse": r.get(f"attn_x_{base}"),
                     "quality": f"min head recall {r['recall_min_head']:.3f}, loss {r['loss_delta']:+.4f}"})
    return rows


def _entmax_bench(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"what": "sparse entmax", "N": r["n"], "method": "predicted graph", "target": f"blocks {r['block_density']:.3f}",
             "baseline": "dense entmax_bisect", "attention_x": r["speedup_vs_dense_entmax"], "forward_x": None,
             "attention_x_all_sparse": None,
             "quality": f"gold recall {r['recall_gold_support']:.3f}, rel. error {r['rel_error_vs_dense']:.1e}"}
            for r in doc["rows"]]


def _prefill_run(doc: dict[str, Any]) -> list[dict[str, Any]]:
    s, c = doc["summary"], doc["config"]
    rows = []
    for base, sp in s.get("speedup", {}).items():
        rows.append({"what": "sparse prefill", "N": c["seq_len"], "method": c["predictor"],
                     "target": f"recall {c['recall']:g}", "baseline": base, "attention_x": sp.get("attention_ms"),
                     "forward_x": sp.get("forward_ms"), "attention_x_all_sparse": sp.get("unguarded_attention"),
                     "quality": f"min head recall {s['recall_min_head']:.3f}, loss {s['loss_delta']:+.4f}"})
    return rows


# (source kind, recogniser, row reader): the three JSON layouts we read
KINDS: list[tuple[str, Callable[[dict], bool], Callable[[dict], list[dict]]]] = [
    ("benchmarks/prefill.py", lambda d: bool(d.get("rows")) and "predictor" in d["rows"][0], _prefill_bench),
    ("benchmarks/sparse_entmax.py", lambda d: bool(d.get("rows")) and "speedup_vs_dense_entmax" in d["rows"][0],
     _entmax_bench),
    ("attnlab sparsity prefill", lambda d: "summary" in d and "speedup" in d.get("summary", {}), _prefill_run),
]


def read_speed_file(path: str | Path) -> dict[str, Any]:
    """One imported source: {file, kind, device, gpu, rows}; a ResultsError names a file of another layout."""
    p = Path(path)
    try:
        doc = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise ResultsError(f"{p}: cannot read speed results ({e})") from e
    for kind, match, read in KINDS:
        if isinstance(doc, dict) and match(doc):
            try:
                rows = read(doc)
            except (KeyError, TypeError) as e:
                raise ResultsError(f"{p}: looks like {kind} output but lacks {e}") from e
            device = str(doc.get("device") or "unknown device")
            return {"file": p.name, "kind": kind, "device": device, "gpu": is_gpu(device), "rows": rows,
                    "partial": bool(doc.get("partial"))}
    raise ResultsError(f"{p}: not a speed result (expected the JSON of benchmarks/prefill.py, "
                       "benchmarks/sparse_entmax.py or `attnlab sparsity prefill --out`)")


def import_speed(run_dir: str | Path, paths: list[str | Path]) -> dict[str, Any]:
    """Add the speed results in ``paths`` to section ``speed`` of ``run_dir`` (a re-imported file replaces itself)."""
    run = RunDir(run_dir, create=False)
    sec = run.section(SECTION) or {"sources": []}
    for p in paths:
        src = read_speed_file(p)
        sec["sources"] = [s for s in sec["sources"] if s["file"] != src["file"]] + [src]
    run.write_section(SECTION, sec)
    return sec


def best_row(sec: dict[str, Any], what: str) -> Optional[tuple[dict, dict]]:
    """(source, row) with the highest as-executed attention speed-up of kind ``what`` measured on a GPU."""
    cands = [(s, r) for s in sec.get("sources", []) if s.get("gpu") for r in s["rows"]
             if r["what"] == what and r.get("attention_x") is not None and r["method"] != "oracle"]
    return max(cands, key=lambda sr: sr[1]["attention_x"]) if cands else None


def speed_line(sec: Optional[dict[str, Any]]) -> str:
    """The summary's bottom line on time: the best GPU speed-ups, or the labelled CPU note."""
    sec = sec or {}
    parts = []
    for what in ("sparse prefill", "sparse entmax"):
        b = best_row(sec, what)
        if b:
            s, r = b
            fwd = f", whole forward x{r['forward_x']:.2f}" if r.get("forward_x") else ""
            parts.append(f"{what} on <b>{html.escape(s['device'])}</b> ({html.escape(s['kind'])}): attention "
                         f"<b>x{r['attention_x']:.2f}</b> vs {html.escape(r['baseline'])}{fwd} at N = {r['N']} "
                         f"({html.escape(r['method'])}, {html.escape(r['target'])}; {html.escape(r['quality'])})")
    if not parts:
        return (f"<b>Speed</b>: not measured here: {CPU_NOTE}. GPU figures: run <code>benchmarks/prefill.py</code>, "
                "<code>benchmarks/sparse_entmax.py</code> or <code>attnlab sparsity prefill --out FILE.json</code> "
                "on a GPU and add them with <code>attnlab report RUN FILE.json</code>.")
    return "<b>Speed</b>: " + "; ".join(parts) + " (prediction and mask building included)."
