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


def test_compare_names_runs_and_has_noise_floor(spectrum_run, tmp_path):
    from attnlab.report.html import render_report
    from attnlab.spectral.compare import compare_runs

    res = compare_runs(spectrum_run, spectrum_run, tmp_path / "cmp")
    assert res["label_a"] == "minilm on stdlib docstrings (run)"
    assert res["layers_a"] == [1, 3] and res["config_a"]["n_sequences"] == 4
    nf = res["noise_floor"]
    assert len(nf["diagonal"]) == 2 and all(0.0 < v <= 1.0 + 1e-9 for v in nf["diagonal"])
    # the same run against itself overlaps perfectly; two halves of it do not
    assert res["overlap"][0][0] == pytest.approx(1.0) and min(nf["diagonal"]) < 0.999
    text = render_report(tmp_path / "cmp").read_text()
    check_self_contained(text)
    assert "Noise floor" in text and "minilm on stdlib docstrings (run) L3" in text
    assert "<td>n_sequences</td><td>4</td><td>4</td>" in text  # the real configuration of both runs


def test_views_of_a_chosen_text(tmp_path, minilm):
    from attnlab.errors import ConfigError
    from attnlab.report.html import render_report
    from attnlab.report.views import attention_views

    text = "The quick brown fox jumps over the lazy dog. " * 6
    meta = attention_views(tmp_path / "v", text, model=minilm, layers=[4], heads=[0, 7], max_tokens=16)
    assert meta["layers"] == [4] and meta["heads"] == [0, 7] and meta["shown"] == 16 and meta["seq_len"] > 16
    assert meta["tokens"][:3] == ["[CLS]", "the", "quick"]
    html = render_report(tmp_path / "v").read_text()
    check_self_contained(html)
    assert f"Only the first 16 of {meta['seq_len']} tokens are drawn" in html and 'value="layer 4"' in html
    with pytest.raises(ConfigError, match="--text"):
        attention_views(tmp_path / "w", "  ", model=minilm)


def test_sparsity_overlay_hit_miss_extra(tmp_path):
    """Predicted vs gold graphs: the saved overlay holds exactly the predictor's graph and the gold graph."""
    import torch

    from attnlab.io import RunDir, read_tensors
    from attnlab.report.views import SPARSITY_VIEWS, save_sparsity_views, sparsity_figures
    from attnlab.sparsity.evaluate import LayerData
    from attnlab.sparsity.predictors import WindowPredictor

    g = torch.Generator().manual_seed(0)
    n = 12
    ev = []
    for _ in range(2):
        q, k = torch.randn(2, 3, n, 4, generator=g), torch.randn(2, 3, n, 4, generator=g)
        gold = torch.rand(2, 3, n, n, generator=g) < 0.3
        ev.append(LayerData(q, k, None, gold, 1.5, 0.5))
    run = RunDir(tmp_path)
    pred = WindowPredictor(1)
    save_sparsity_views(run, {"window": [pred, pred]}, ev, {"window": {"knob": 2, "sparsity": 0.5}}, max_heads=2)
    t, meta = read_tensors(run.file(SPARSITY_VIEWS))
    assert meta["heads"] == [0, 1] and meta["shown"] == n
    band = (torch.arange(n)[:, None] - torch.arange(n)[None, :]).abs() <= 2  # the knob of the operating point
    assert torch.equal(t["pred.window.1"].bool(), band.expand(2, n, n))
    assert torch.equal(t["gold.0"].bool(), ev[0].gold[0, :2])
    html = sparsity_figures(run)
    assert html.count("<img") == 1 and "hit" in html and "miss" in html and "extra" in html
