"""Render a run directory into one self-contained report.html (PNG plots embedded as data URIs)."""

from __future__ import annotations

import base64
import html
import importlib
import json
import platform
import re
from pathlib import Path
from typing import Any, Callable

from ..errors import ResultsError
from ..io import RunDir, _atomic_write_bytes

# (results section, "module:function" rendering it, title), in report order.
SECTIONS = [
    ("spectrum", "attnlab.spectral.report:render_section", "Spectrum"),
    ("compare", "attnlab.spectral.report:render_compare", "Cross-run overlap"),
    ("reconstruct", "attnlab.reconstruct.report:render_section", "Reconstruction from partial computation"),
    ("sparsity", "attnlab.sparsity.report:render_section", "Sparsity prediction (Sparsefinder)"),
    ("variables", "attnlab.variables.report:render_section", "Variable creation"),
]

STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{border-bottom:2px solid #444}h2{margin-top:2em;border-bottom:1px solid #ccc}
table{border-collapse:collapse;margin:1em 0;font-size:0.9em}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f2f2f2}img{max-width:100%;margin:0.5em 0;border:1px solid #eee}
.note{color:#555;font-size:0.9em}pre{background:#f7f7f7;padding:0.8em;overflow-x:auto;font-size:0.8em}
nav a{margin-right:1em}
"""


def cell(v: Any, float_fmt: str = "{:.4g}") -> str:
    """Short, escaped text for a table cell: None as a dash, booleans as yes/blank, floats by ``float_fmt``."""
    if v is None:
        return "&mdash;"
    if isinstance(v, bool):
        return "yes" if v else ""
    if isinstance(v, float):
        return float_fmt.format(v)
    return html.escape(str(v))


def table(header: list[str], rows: list[list[Any]], float_fmt: str = "{:.4g}") -> str:
    """An HTML table with a header row."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell(c, float_fmt)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _embed_images(fragment: str, run: RunDir) -> str:
    def repl(m: re.Match) -> str:
        name = m.group(1)
        path = run.file(name)
        if name.startswith("data:") or not path.is_file():
            return m.group(0)
        data = base64.b64encode(path.read_bytes()).decode()
        return f'src="data:image/png;base64,{data}"'

    return re.sub(r'src="([^"]+\.png)"', repl, fragment)


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for mod in ("attnlab", "torch", "transformers", "entmax", "numpy"):
        try:
            out[mod] = getattr(importlib.import_module(mod), "__version__", "?")
        except ImportError:
            out[mod] = "not installed"
    return out


def render_report(run_dir: str | Path, strict: bool = False) -> Path:
    """Write ``run_dir/report.html`` from every section results.json has; returns its path.

    A section that cannot be rendered is noted in the page; with ``strict`` a ResultsError naming it follows."""
    run = RunDir(run_dir, create=False)
    results = run.results()
    parts, nav, failed = [], [], []
    for key, target, title in SECTIONS:
        if key not in results:
            continue
        module, func = target.split(":")
        try:
            render: Callable[[RunDir], str] = getattr(importlib.import_module(module), func)
            body = render(run)
        except Exception as e:  # a broken section must not hide the others
            failed.append(f"{key} ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})")
            body = f'<p class="note">could not render this section: {html.escape(repr(e))}</p>'
        nav.append(f'<a href="#{key}">{title}</a>')
        parts.append(f'<section id="{key}"><h2>{title}</h2>{_embed_images(body, run)}</section>')
    if not parts:
        parts.append('<p class="note">This run directory has no results yet.</p>')
    cfg = run.file("config.json")
    config_text = html.escape(cfg.read_text()) if cfg.exists() else "{}"
    versions = html.escape(json.dumps(_versions(), indent=1))
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>attnlab report: {html.escape(run.path.name)}</title>
<style>{STYLE}</style></head><body><h1>attnlab report: {html.escape(run.path.name)}</h1>
<nav>{''.join(nav)}</nav>{''.join(parts)}
<h2>Configuration</h2><pre>{config_text}</pre><h2>Versions</h2><pre>{versions}</pre></body></html>"""
    path = run.file("report.html")
    _atomic_write_bytes(path, page.encode())
    if failed and strict:
        raise ResultsError(f"{path}: written, but malformed section(s) could not be rendered: {'; '.join(failed)}")
    return path
