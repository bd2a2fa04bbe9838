"""The report is one self-contained file: every image embedded, no relative or remote reference, real labels."""

from __future__ import annotations

import json
import shutil
from html.parser import HTMLParser

import pytest


class _Refs(HTMLParser):
    """Collects every src/href attribute value and every <script>/<link> tag."""

    def __init__(self):
        super().__init__()
        self.refs: list[tuple[str, str, str]] = []
        self.tags: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        for k, v in attrs:
            if k in ("src", "href", "action", "poster", "data"):
                self.refs.append((tag, k, v or ""))


def check_self_contained(text: str) -> _Refs:
    """Assert that a report makes no request: only data: URIs and in-page anchors."""
    p = _Refs()
    p.feed(text)
    assert "img" in p.tags
    for tag, attr, v in p.refs:
        assert v.startswith("data:") or v.startswith("#"), f"<{tag} {attr}={v[:80]!r}> is not self-contained"
        assert not v.startswith("data:,"), f"<{tag}> refers to a missing file"
        assert "http://" not in v and "https://" not in v
    assert "link" not in p.tags and "iframe" not in p.tags
    return p


def test_report_self_contained_summary_and_real_layers(spectrum_run):
    from attnlab.report.html import render_report

    path = render_report(spectrum_run)
    text = path.read_text()
    p = check_self_contained(text)
    assert sum(1 for t in p.tags if t == "img") >= 6  # 4 spectrum plots, eigenvectors, views
    assert "<script>" in text and "<script src" not in text
    # summary with the spectrum's key number and its spread across heads
    res = json.loads((spectrum_run / "results.json").read_text())["spectrum"]
    assert 'id="summary"' in text and f"{res['pooled']['k90']} of 32 eigenvectors" in text
    assert "over 6 heads" in text
    # layers keep their real indices (--layers 1,3), in the attention views and the tables
    assert 'value="layer 3"' in text and 'value="layer 0"' not in text
    # row curves go to k = N, so the 90% line is reached
    assert len(res["per_layer"]["1"]["curve"]) == 32 and res["per_layer"]["1"]["curve"][-1] == pytest.approx(1.0)
    # figures have captions, config is collapsed
    assert text.count("<figcaption>") == text.count("<img")
    assert "<details><summary>config.json" in text


def test_embed_files_single_quotes_missing_and_remote(tmp_path):
    from attnlab.io import RunDir
    from attnlab.report.html import embed_files

    run = RunDir(tmp_path)
    (tmp_path / "a.png").write_bytes(b"\x89PNG fake")
    out = embed_files("<img src='a.png'><img src=\"b.png\"><a href='#x'>x</a><img src='https://e.com/c.png'>", run)
    assert "src='data:image/png;base64," in out
    assert out.count('src="data:,"') == 2  # missing file and remote URL are dropped, not linked
    assert "href='#x'" in out and "https://" not in out.replace('data-missing="https://e.com/c.png"', "")


def test_table_sortable_collapsed_and_toggles():
    from attnlab.report.html import table

    rows = [[f"m{i % 3}", float(i) / 3] for i in range(20)]
    t = table(["method", "value"], rows, group_col=0, collapse=12)
    assert t.startswith("<details>") and 'class="sortable"' in t
    assert 'title="0.3333333333333333"' in t  # hover shows the full value
    assert t.count('type="checkbox"') == 3 and 'data-group="m1"' in t
    assert not table(["a"], [[1]]).startswith("<details>")
