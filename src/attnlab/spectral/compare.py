"""Eigenspace overlap between two spectrum runs (two models, or two corpora)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from ..errors import ShapeError
from ..io import RunDir
from .analysis import cross_overlap
from .run import load_bases


def compare_runs(run_a: str | Path, run_b: str | Path, out: Optional[str | Path] = None) -> dict[str, Any]:
    """Layer x layer subspace similarity between the per-layer bases of two runs (same seq_len required)."""
    bases_a, meta_a = load_bases(run_a)
    bases_b, meta_b = load_bases(run_b)
    if meta_a.get("seq_len") != meta_b.get("seq_len"):
        raise ShapeError(f"runs have different --seq-len ({meta_a.get('seq_len')} vs {meta_b.get('seq_len')}); "
                         "bases live in different spaces")
    k = min(next(iter(bases_a.values())).shape[1], next(iter(bases_b.values())).shape[1])
    overlap = cross_overlap({l: b[:, :k] for l, b in bases_a.items()}, {l: b[:, :k] for l, b in bases_b.items()})
    res = {"run_a": str(run_a), "run_b": str(run_b), "model_a": meta_a.get("model"), "model_b": meta_b.get("model"),
           "k": k, "seq_len": meta_a.get("seq_len"), "overlap": overlap.tolist(),
           "chance": k / int(meta_a.get("seq_len") or 1)}
    if out is not None:
        from ..report.plotting import heatmap

        run = RunDir(out)
        run.write_section("compare", res)
        heatmap(overlap, f"Cross-run eigenspace overlap (k={k})", f"layer ({meta_b.get('model')})",
                f"layer ({meta_a.get('model')})", run.file("compare_overlap.png"), vmin=0, vmax=1)
    return res
