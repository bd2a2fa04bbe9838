"""`attnlab demo`: every pillar on the packaged MiniLM and the stdlib-docstring corpus, then report.html.

Small settings chosen so that each pillar still says something (see :data:`MEASURED`): the spectrum with a
short length sweep (rank needed vs length), reconstruction with its best method at a stated total compute,
Sparsefinder on the entmax-fine-tuned MiniLM (gold graphs sparser than the 0.9 operating point) next to the
oracle bound, and variable creation on a short range of lengths. ``quick=True`` is a smoke test of every
report view, not a measurement. Every step shows progress (a live line on a terminal, plain lines
otherwise); each step's wall time goes into timings.json; the demo ends with the report path and one
bottom line per pillar.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Optional


PILLARS = ("spectrum", "reconstruct", "sparsity", "variables")
SECTION = "demo"

#: What the default demo took when last measured (shown by ``attnlab demo --help``; re-measure with
#: ``benchmarks/defaults_time.py --only demo``).
MEASURED = ("measured 3 min 22 s wall (231 CPU-s) on 2 CPU cores at load about 1, first run (entmax "
            "fine-tuning not yet cached, 81 s of it)")

_log = logging.getLogger(__name__)


def demo_settings(quick: bool, n_sequences: int, seq_len: int) -> dict[str, dict[str, Any]]:
    """Per pillar, the keyword arguments of its runner (quick: the smallest that exercise every view)."""
    if quick:
        return {
            "spectrum": dict(n_sequences=n_sequences, seq_len=seq_len, sketch_size=8),
            "lengths": dict(lengths=[16, 32], n_sequences=8),
            "reconstruct": dict(seq_len=min(seq_len, 32), n_fit=8, n_eval=4, estimators=["gaussian", "proxy+gaussian"],
                                selections=["random", "adaptive", "oracle"], budgets=[0.125, 0.5], extra_ranks=[],
                                pooled_baseline=False, layers=[0, 5], position=False, dropin=True),
            "sparsity": dict(hf_seq_len=min(seq_len, 32), n_fit=8, n_eval=4, n_down=4, epochs=3,
                             methods=["distance-knn", "window", "oracle-topk"]),
            "variables": dict(task="and", s=2, Ts=[8, 16], seeds=1, contrast="none",
                              train={"max_steps": 60, "d_model": 32, "n_val": 256, "n_test": 256},
                              search={"m_min": 16, "m_max": 64, "rtol": 0.5}, probe=True),
        }
    return {
        "spectrum": dict(n_sequences=n_sequences, seq_len=seq_len, sketch_size=8),
        # the main spectrum gives the longest point; two shorter lengths make the sweep
        "lengths": dict(lengths=[seq_len // 4, seq_len // 2], n_sequences=n_sequences),
        # best method at total compute <= 0.5 of dense QK^T, next to the dense-quality methods and their cost
        "reconstruct": dict(seq_len=min(seq_len, 64), n_fit=32, n_eval=16, estimators=["gaussian", "proxy+gaussian"],
                            selections=["random", "adaptive", "oracle"], budgets=[], extra_ranks=[8],
                            pooled_baseline=False, position=False, compute=0.5,
                            families=["proxy-only", "topb-proxy", "gaussian-qr", "topb-proxy+gaussian"],
                            frontier_ranks=[4], frontier_budgets=[1 / 8, 1 / 4], chunks=4, dropin=False),
        # entmax-fine-tuned MiniLM (cached after the first run): gold sparsity ~0.95 at 128 tokens
        "sparsity": dict(hf_seq_len=seq_len, n_fit=16, n_eval=16, n_down=0, epochs=4,
                         methods=["distance-knn", "rank", "window", "bigbird", "oracle-topk"]),
        "variables": dict(task="and", s=2, Ts=[8, 12, 16, 24, 32], seeds=1, contrast="none",
                          train={"max_steps": 150, "d_model": 32, "n_val": 256, "n_test": 512},
                          search={"m_min": 8, "m_max": 256, "rtol": 0.25}, probe=True),
    }


def run_demo(out: str | Path, n_sequences: int = 64, seq_len: int = 128, quick: bool = False,
             pillars: tuple[str, ...] = PILLARS, log: Optional[Callable[[str], None]] = None,
             progress: bool = True) -> Path:
    """Run the demo into ``out``; returns the path of report.html (``log``: where the step lines go; ``progress``:
    live progress of every step)."""
    from .io import RunDir
    from .reconstruct.run import reconstruct
    from .report.html import render_report
    from .report.lengths import rank_vs_length
    from .sparsity.run import sparsity
    from .spectral.run import spectrum
    from .timing import Phases
    from .variables.experiment import run_variables

    log = log or _log.info
    cfg = demo_settings(quick, n_sequences, seq_len)
    steps: dict[str, Callable[[], object]] = {
        "spectrum": lambda: spectrum(out, model="minilm", progress=progress, **cfg["spectrum"]),
        "rank vs length": lambda: rank_vs_length(out, model="minilm", progress=progress, **cfg["lengths"]),
        "reconstruct": lambda: reconstruct(out, model="minilm", progress=progress, **cfg["reconstruct"]),
        "sparsity": lambda: sparsity(out, model="minilm", quiet=not progress, **cfg["sparsity"]),
        "variables": lambda: run_variables(out, progress=progress, **cfg["variables"]),
    }
    chosen = [s for s in steps if s.split()[0] in pillars or (s == "rank vs length" and "spectrum" in pillars)]
    phases = Phases()
    for i, name in enumerate(chosen, 1):
        log(f"[demo {i}/{len(chosen)}] {name} ...")
        with phases(name.replace(" ", "_")):
            steps[name]()
        log(f"[demo {i}/{len(chosen)}] {name} done in {phases.seconds[name.replace(' ', '_')]:.0f} s")
    RunDir(out).write_section(SECTION, {"quick": quick, "pillars": list(pillars), "settings": cfg,
                                        "phases": phases.as_dict()})
    return render_report(out)


def bottom_lines(out: str | Path) -> list[str]:
    """The report summary's lines as plain text (what the CLI prints after the report path)."""
    from .io import RunDir
    from .report.summary import plain, summary_lines

    return [plain(x) for x in summary_lines(RunDir(out, create=False).results())]
