"""report.html, moved alone into an empty directory, renders in a real headless browser with every image.

Runs in the default suite wherever a Chromium can be found (.ci/run installs Debian's `chromium`);
skips only when no browser can be had.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

CHROMIUM = next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
                 if shutil.which(b)), None)
needs_browser = pytest.mark.skipif(CHROMIUM is None, reason="no chromium on this machine (apt-get install chromium)")


def screenshot(html: Path, tmp: Path, height: int = 3000) -> np.ndarray:
    """Move ``html`` alone into an empty directory, screenshot it there, return the RGB image."""
    from matplotlib.image import imread

    alone = tmp / "alone"
    alone.mkdir()
    moved = alone / "report.html"
    shutil.copy(html, moved)
    assert os.listdir(alone) == ["report.html"]
    shot = tmp / "shot.png"
    subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    "--disable-dev-shm-usage", f"--user-data-dir={tmp / 'profile'}", f"--window-size=1200,{height}",
                    f"--screenshot={shot}", moved.resolve().as_uri()],
                   check=True, capture_output=True, timeout=300, cwd=alone)
    return imread(shot)[..., :3]


def colourful(img: np.ndarray) -> int:
    """Distinct saturated colours: text and table borders are grey, plots are not."""
    px = (img * 255).astype(np.int16).reshape(-1, 3)
    sat = px[(px.max(1) - px.min(1)) > 60]
    return len(np.unique(sat, axis=0))


@needs_browser
def test_report_alone_renders_its_plots(spectrum_run, tmp_path):
    from attnlab.report.html import render_report

    img = screenshot(render_report(spectrum_run), tmp_path)
    assert img.shape[0] >= 2000 and img.shape[1] >= 1000
    # Plots drawn: many saturated colours (the same page with broken image links shows about 200).
    n = colourful(img)
    assert n > 1000, n


@pytest.mark.slow
@needs_browser
def test_demo_report_screenshot(tmp_path, saved_overlaps):
    from attnlab.demo import run_demo

    html = run_demo(tmp_path / "run", n_sequences=8, seq_len=32, quick=True)
    assert saved_overlaps and [f for f in saved_overlaps if f[1]] == []  # no figure of any pillar has overlapping text
    img = screenshot(html, tmp_path, height=6000)
    assert colourful(img) > 1000
