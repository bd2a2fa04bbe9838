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
    cfg_a, cfg_b = _config(run_a), _config(run_b)
    for cfg, run_dir in ((cfg_a, run_a), (cfg_b, run_b)):  # the model's real name (a passed-in object has none)
        name = ((RunDir(run_dir, create=False).section("spectrum") or {}).get("model") or {}).get("name")
        if name and cfg.get("model") in (None, "HFModel", "SmallTransformer"):
            cfg["model"] = name
    res = {"run_a": str(run_a), "run_b": str(run_b), "model_a": meta_a.get("model"), "model_b": meta_b.get("model"),
           "label_a": _label(run_a, meta_a, cfg_a), "label_b": _label(run_b, meta_b, cfg_b),
           "config_a": cfg_a, "config_b": cfg_b, "layers_a": sorted(bases_a), "layers_b": sorted(bases_b),
           "k": k, "seq_len": meta_a.get("seq_len"), "overlap": overlap.tolist(),
           "chance": k / int(meta_a.get("seq_len") or 1)}
    nf = (RunDir(run_a, create=False).section("spectrum") or {}).get("noise_floor")
    if nf and nf.get("k") == k:
        res["noise_floor"] = nf
    if out is not None:
        from ..report.plotting import heatmap

        run = RunDir(out)
        run.write_section("compare", res)
        heatmap(overlap, f"Cross-run eigenspace overlap (k={k})", f"layer of B: {res['label_b']}",
                f"layer of A: {res['label_a']}", run.file("compare_overlap.png"), vmin=0, vmax=1,
                xticklabels=[str(l) for l in res["layers_b"]], yticklabels=[str(l) for l in res["layers_a"]],
                cbar_label="subspace overlap")
    return res


def _config(run_dir: str | Path) -> dict[str, Any]:
    """The spectrum settings a run directory was made with ({} if it has none)."""
    run = RunDir(run_dir, create=False)
    sec = run.section("spectrum") or {}
    return dict(sec.get("config") or {})


def _label(run_dir: str | Path, meta: dict[str, Any], cfg: dict[str, Any]) -> str:
    """'<model> on <corpus> (<run dir name>)': distinguishes two runs of one model on two corpora."""
    corpus = cfg.get("corpus") or "stdlib docstrings"
    return f"{cfg.get('model') or meta.get('model')} on {Path(str(corpus)).name or corpus} ({Path(run_dir).name})"
