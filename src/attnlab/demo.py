"""`attnlab demo`: every pillar on the packaged MiniLM and the stdlib-docstring corpus, then report.html.

The main job is the spectrum; the other pillars run at small settings so that the whole demo takes a few
minutes on two CPU cores, and ``quick=True`` (``attnlab demo --quick``) about a minute and a half. Each step
logs one line; the report collects them all.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable, Optional

from .report.html import render_report

PILLARS = ("spectrum", "reconstruct", "sparsity", "variables")

_log = logging.getLogger(__name__)


def _step(name: str, fn: Callable[[], object], log: Callable[[str], None]) -> None:
    t0, c0 = time.perf_counter(), time.process_time()
    log(f"[demo] {name} ...")
    fn()
    log(f"[demo] {name} done in {time.perf_counter() - t0:.0f} s (CPU {time.process_time() - c0:.0f} s)")


def run_demo(out: str | Path, n_sequences: int = 128, seq_len: int = 128, quick: bool = False,
             pillars: tuple[str, ...] = PILLARS, log: Optional[Callable[[str], None]] = None) -> Path:
    """Run the demo into ``out``; returns the path of report.html.

    ``quick``: the smallest settings that still exercise every pillar and every report view (a smoke test,
    not a measurement: a few windows, small method grids, a short training).
    """
    from .reconstruct.run import reconstruct
    from .spectral.run import spectrum
    from .sparsity.run import sparsity
    from .variables.experiment import run_variables

    log = log or _log.info
    small = 8 if quick else 16
    if quick:
        recon = dict(n_fit=small, n_eval=4, estimators=["gaussian", "proxy+gaussian"],
                     selections=["random", "adaptive", "oracle"], budgets=[0.125, 0.5], extra_ranks=[],
                     pooled_baseline=False, layers=[0, 5])  # two of six layers: the estimators dominate its time
    else:
        recon = dict(n_fit=64, n_eval=small, estimators=["gaussian", "basis", "proxy+gaussian"],
                     selections=["random", "fixed", "leverage", "local", "adaptive", "oracle"],
                     budgets=[0.125, 0.25, 0.5], extra_ranks=[8])
    steps = {
        "spectrum": lambda: spectrum(out, model="minilm", n_sequences=n_sequences, seq_len=seq_len,
                                     sketch_size=8 if quick else 16, progress=not quick),
        "reconstruct": lambda: reconstruct(out, model="minilm", seq_len=min(seq_len, 32) if quick else seq_len,
                                           position=False, progress=not quick, **recon),
        "sparsity": lambda: sparsity(out, model="minilm", hf_seq_len=min(seq_len, 32 if quick else 64), n_fit=small,
                                     n_eval=4 if quick else small, n_down=4 if quick else small,
                                     epochs=3 if quick else 10, quiet=quick,
                                     methods=["distance-knn", "window", "oracle-topk"] if quick else None),
        "variables": lambda: run_variables(
            out, task="and", s=2, Ts=[8, 16] if quick else [8, 12, 16, 24, 32], seeds=1,
            contrast="none" if quick else "mlp",
            train={"max_steps": 60, "d_model": 32, "n_val": 256, "n_test": 256} if quick else
            {"max_steps": 200, "d_model": 32},
            search={"m_min": 16, "m_max": 64, "rtol": 0.5} if quick else {"m_min": 8, "m_max": 512, "rtol": 0.25},
            probe=True,
            progress=not quick),
    }
    for name in pillars:
        _step(name, steps[name], log)
    return render_report(out)
