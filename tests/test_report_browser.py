"""The report renders in a real headless browser (Debian chromium) and is not blank."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on this machine (apt-get install chromium)")
def test_report_screenshot(tmp_path):
    from matplotlib.image import imread

    from attnlab.demo import run_demo

    html = run_demo(tmp_path / "run", n_sequences=8, seq_len=32, quick=True)
    shot = tmp_path / "report.png"
    subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,2000", f"--screenshot={shot}",
                    html.resolve().as_uri()], check=True, capture_output=True, timeout=180)
    img = imread(shot)
    assert img.shape[0] >= 1000 and img.shape[1] >= 1000
    # Not blank: plots put many distinct colours on the page.
    colours = np.unique((img[..., :3] * 255).astype(np.uint8).reshape(-1, 3), axis=0)
    assert len(colours) > 200
