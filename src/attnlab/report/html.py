"""Render a run directory into one self-contained report.html.

Every image is embedded as a data URI and the page's only script is inline, so the file can be copied,
mailed or opened offline: it makes no request of any kind. Tables sort on a header click, show full values
on hover, long ones start collapsed, and tables with a method column get show/hide toggles per method.
"""

from __future__ import annotations

import base64
import html
import importlib
import json
import logging
import mimetypes
import os
import platform
import re
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from ..errors import ConfigError, ResultsError
from ..io import RunDir, _atomic_write_bytes

log = logging.getLogger(__name__)

# (results section, "module:function" rendering it, title), in report order.
SECTIONS = [
    ("spectrum", "attnlab.spectral.report:render_section", "Spectrum"),
    ("views", "attnlab.report.views:render_section", "Attention views"),
    ("capture", "attnlab.report.views:render_capture", "Captured scores"),
    ("compare", "attnlab.spectral.report:render_compare", "Cross-run overlap"),
    ("reconstruct", "attnlab.reconstruct.report:render_section", "Reconstruction from partial computation"),
    ("sparsity", "attnlab.sparsity.report:render_section", "Sparsity prediction (Sparsefinder)"),
    ("variables", "attnlab.variables.report:render_section", "Variable creation"),
    ("rank_vs_length", "attnlab.report.lengths:render_section", "Rank needed vs length"),
    ("speed", "attnlab.report.speed_view:render_section", "Speed (imported GPU results)"),
]

# Tables with more rows than this start collapsed.
COLLAPSE_ROWS = 12

STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{border-bottom:2px solid #444}h2{margin-top:2em;border-bottom:1px solid #ccc}
table{border-collapse:collapse;margin:0.5em 0 1em;font-size:0.88em}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
td:first-child,th:first-child{text-align:left}
th{background:#f2f2f2;cursor:pointer;user-select:none}th.asc::after{content:" \\25B2"}th.desc::after{content:" \\25BC"}
tr.hidden{display:none}
img{max-width:100%;margin:0.3em 0;border:1px solid #eee}
figure{margin:1em 0}figcaption{color:#444;font-size:0.9em;max-width:900px}
.note{color:#555;font-size:0.9em}pre{background:#f7f7f7;padding:0.8em;overflow-x:auto;font-size:0.8em}
nav a{margin-right:1em}
.summary{background:#f5f8fc;border:1px solid #c9d6e8;padding:0.6em 1em;border-radius:4px}
.summary li{margin:0.35em 0}
.toggles{font-size:0.85em;margin:0.3em 0}.toggles label{margin-right:0.8em;white-space:nowrap}
details>summary{cursor:pointer;color:#245;margin:0.4em 0}
.grid{display:flex;flex-wrap:wrap;gap:0.5em;align-items:flex-start}
"""

# Inline script: sortable tables and per-method toggles. No network access of any kind.
SCRIPT = """
(function(){
function val(td){var t=td.getAttribute('data-v');if(t===null)t=td.textContent.trim();
 var x=parseFloat(t);return (t!==''&&!isNaN(x)&&/^[-+]?[0-9.]+(e[-+]?[0-9]+)?$/i.test(t))?x:t.toLowerCase();}
document.querySelectorAll('table.sortable').forEach(function(tb){
 tb.querySelectorAll('thead th').forEach(function(th,i){th.addEventListener('click',function(){
  var asc=!th.classList.contains('asc');tb.querySelectorAll('thead th').forEach(function(h){h.classList.remove('asc','desc');});
  th.classList.add(asc?'asc':'desc');var body=tb.tBodies[0];var rows=Array.prototype.slice.call(body.rows);
  rows.sort(function(a,b){var x=val(a.cells[i]),y=val(b.cells[i]);
   if(typeof x===typeof y)return (x<y?-1:x>y?1:0)*(asc?1:-1);return (typeof x==='number'?-1:1)*(asc?1:-1);});
  rows.forEach(function(r){body.appendChild(r);});});});});
document.querySelectorAll('div.toggles').forEach(function(div){
 var target=document.getElementById(div.getAttribute('data-for'));if(!target)return;
 div.querySelectorAll('input').forEach(function(cb){cb.addEventListener('change',function(){
  var on={};div.querySelectorAll('input').forEach(function(c){on[c.value]=c.checked;});
  target.querySelectorAll('[data-group]').forEach(function(el){
   el.classList.toggle('hidden',!on[el.getAttribute('data-group')]);
   if(el.tagName!=='TR')el.style.display=on[el.getAttribute('data-group')]?'':'none';});});});});
})();
"""

_table_ids = {"n": 0}


def cell(v: Any, float_fmt: str = "{:.4g}") -> str:
    """Short, escaped text for a table cell: None as a dash, booleans as yes/no, floats by ``float_fmt``."""
    if v is None:
        return "&mdash;"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return float_fmt.format(v)
    if isinstance(v, (list, tuple)):  # nested lists ([[0.9198]]) flattened, each number rounded
        flat = list(_flatten(v))
        return ", ".join(cell(x, float_fmt) for x in flat) if flat else "&mdash;"
    return html.escape(str(v))


def _flatten(v: Any):
    for x in v:
        if isinstance(x, (list, tuple)):
            yield from _flatten(x)
        else:
            yield x


def _td(v: Any, float_fmt: str) -> str:
    """A cell whose hover title and sort key are the full-precision value."""
    if isinstance(v, float) and not isinstance(v, bool):
        return f'<td title="{v!r}" data-v="{v!r}">{cell(v, float_fmt)}</td>'
    return f"<td>{cell(v, float_fmt)}</td>"


def table(header: Sequence[str], rows: Sequence[Sequence[Any]], float_fmt: str = "{:.4g}",
          group_col: Optional[int] = None, collapse: Optional[int] = COLLAPSE_ROWS, caption: str = "") -> str:
    """A sortable HTML table; hover a number for its full value.

    ``group_col``: column whose values get show/hide checkboxes (e.g. the method). Tables longer than
    ``collapse`` rows start collapsed inside a <details> element.
    """
    _table_ids["n"] += 1
    tid = f"t{_table_ids['n']}"
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = []
    for row in rows:
        grp = f' data-group="{html.escape(str(row[group_col]))}"' if group_col is not None else ""
        body.append(f"<tr{grp}>" + "".join(_td(c, float_fmt) for c in row) + "</tr>")
    out = (f'<table class="sortable" id="{tid}"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>')
    if group_col is not None:
        groups = list(dict.fromkeys(str(r[group_col]) for r in rows))
        if len(groups) > 1:
            out = toggles(tid, groups) + out
    if caption:
        out = f'<p class="note">{caption}</p>' + out
    if collapse is not None and len(rows) > collapse:
        out = f"<details><summary>Show table ({len(rows)} rows)</summary>{out}</details>"
    return out


def toggles(target_id: str, groups: Sequence[str], label: str = "show", on: Optional[Sequence[str]] = None) -> str:
    """Checkboxes that show/hide the elements with ``data-group`` inside element ``target_id`` (``on``: the
    groups checked at first, default all; pass the same hidden flag to :func:`figure`)."""
    boxes = "".join(f'<label><input type="checkbox" value="{html.escape(g)}"'
                    f'{" checked" if on is None or g in on else ""}> {html.escape(g)}</label>' for g in groups)
    return f'<div class="toggles" data-for="{target_id}">{html.escape(label)}: {boxes}</div>'


def figure(src: str, caption: str, alt: Optional[str] = None, group: Optional[str] = None, hidden: bool = False) -> str:
    """An image with a caption (``src``: a file name in the run directory, embedded at render time, or a data URI)."""
    grp = f' data-group="{html.escape(group)}"' if group is not None else ""
    grp += ' style="display:none"' if hidden else ""
    return (f'<figure{grp}><img src="{html.escape(src)}" alt="{html.escape(alt or caption)}">'
            f"<figcaption>{caption}</figcaption></figure>")


def png_data_uri(fig) -> str:
    """A matplotlib figure as a PNG data URI (closes the figure)."""
    import io

    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    finally:
        plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


_SRC = re.compile(r"""\b(src|href)=(["'])(.*?)\2""", re.S)


def embed_files(fragment: str, run: RunDir) -> str:
    """Replace every relative ``src``/``href`` naming a run-directory file by a data URI.

    A reference to a missing file becomes a visible note instead of a broken link; in-page anchors
    (``#...``) and data URIs are kept.
    """
    def repl(m: re.Match) -> str:
        attr, quote, ref = m.group(1), m.group(2), html.unescape(m.group(3))
        if ref.startswith(("data:", "#")):
            return m.group(0)
        path = run.file(ref)
        if re.match(r"^[a-z][a-z0-9+.-]*:", ref, re.I) or not path.is_file():
            log.warning("report: %s=%r is not a file of %s; dropped", attr, ref, run.path)
            return f'{attr}="data:," data-missing="{html.escape(ref)}"'
        mime = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        data = base64.b64encode(path.read_bytes()).decode()
        return f"{attr}={quote}data:{mime};base64,{data}{quote}"

    return _SRC.sub(repl, fragment)


# kept for callers of the old name
_embed_images = embed_files


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

    The page starts with a summary (one line per pillar with its key numbers and their spread), then
    one section per analysis; configuration and versions come last, collapsed. A section that cannot be
    rendered is noted in the page; with ``strict`` a ResultsError naming it follows.
    """
    from .summary import summary_html

    if not isinstance(run_dir, (str, os.PathLike)):
        raise ConfigError(f"run_dir must be a run directory path (str or Path), got {type(run_dir).__name__}")
    run = RunDir(run_dir, create=False)
    results = run.results()
    _table_ids["n"] = 0
    parts, nav, failed = [], [], []
    for key, target, title in SECTIONS:
        if key not in results and not (key == "views" and run.file("views.safetensors").exists()):
            continue
        module, func = target.split(":")
        try:
            render: Callable[[RunDir], str] = getattr(importlib.import_module(module), func)
            body = render(run)
        except Exception as e:  # a broken section must not hide the others
            failed.append(f"{key} ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})")
            log.warning("report: section %s could not be rendered: %r", key, e)
            body = f'<p class="note">could not render this section: {html.escape(repr(e))}</p>'
        if not body:
            continue
        nav.append(f'<a href="#{key}">{title}</a>')
        parts.append(f'<section id="{key}"><h2>{title}</h2>{embed_files(body, run)}</section>')
    if not parts:
        parts.append('<p class="note">This run directory has no results yet.</p>')
    try:
        summary = summary_html(results)
    except Exception as e:
        log.warning("report: summary could not be computed: %r", e)
        summary = f'<p class="note">summary unavailable: {html.escape(repr(e))}</p>'
    cfg = run.file("config.json")
    config_text = html.escape(cfg.read_text()) if cfg.exists() else "(no config.json)"
    versions = html.escape(json.dumps(_versions(), indent=1))
    name = html.escape(run.path.resolve().name)
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>attnlab report: {name}</title>
<style>{STYLE}</style></head><body><h1>attnlab report: {name}</h1>
{summary}<nav>{''.join(nav)}<a href="#config">Configuration</a></nav>{''.join(parts)}
<h2 id="config">Configuration and versions</h2>
<details><summary>config.json (settings of every command that wrote this run directory)</summary><pre>{config_text}</pre></details>
<details><summary>Package versions</summary><pre>{versions}</pre></details>
<script>{SCRIPT}</script></body></html>"""
    path = run.file("report.html")
    _atomic_write_bytes(path, page.encode())
    if failed and strict:
        raise ResultsError(f"{path}: written, but malformed section(s) could not be rendered: {'; '.join(failed)}")
    return path
