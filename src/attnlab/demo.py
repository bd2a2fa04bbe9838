"""`attnlab demo`: the main job on the packaged model and default corpus, ending in report.html."""

from __future__ import annotations

from pathlib import Path

from .report.html import render_report
from .spectral.run import spectrum


def run_demo(out: str | Path, n_sequences: int = 128, seq_len: int = 128, quick: bool = False) -> Path:
    """Spectrum of MiniLM on stdlib docstrings (and the other pillars' quick checks), then the report."""
    spectrum(out, model="minilm", n_sequences=n_sequences, seq_len=seq_len, sketch_size=8 if quick else 16)
    return render_report(out)
