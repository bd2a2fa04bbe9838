"""The attention probe against the norm bound: does a tighter bound on ||W_Q^T W_K||_F concentrate attention?

At one T and one train size m, every seed is trained under each qk bound (the other bounds unchanged) and each
trial records the readout attention mass on the s relevant positions (on fresh test inputs). Beside it stands the
cap the bound itself puts on that mass (:func:`attnlab.variables.probe.mass_cap`): the scores are bounded by
4 emb^2 qk / sqrt(d_head), so a tight bound cannot concentrate attention however the head is trained. Trials are
stored per bound (``variables_probe_bounds_qk<b>.json``) and reused by ``--resume``.
"""

from __future__ import annotations

import math
from dataclasses import asdict
from typing import Any, Callable, Optional

import numpy as np

from ..distributed import DistInfo, broadcast_object
from ..io import RunDir
from .complexity import TrialStore, _run_round, distributed_learner
from .ensemble import Bounds, EnsembleConfig
from .probe import mass_cap

PROBE_BOUNDS_FILE = "variables_probe_bounds_qk{b:g}.json"


def probe_point(section: dict[str, Any], T: Optional[int], m: Optional[int], m_max: int) -> tuple[int, int]:
    """(T, m) of the probe: T defaults to the largest T with a reached m*, m to twice that T's median m*."""
    done = [r for r in section.get("results", []) if r.get("m_star") is not None]
    if T is None:
        T = done[-1]["T"] if done else max((r["T"] for r in section.get("results", [])), default=16)
    if m is None:
        at = next((r for r in done if r["T"] == T), None)
        m = min(m_max, int(math.ceil(2 * at["m_star"]))) if at else m_max
    return int(T), int(m)


def _row(b: float, recs: list[dict[str, Any]], cap: float, threshold: float) -> dict[str, Any]:
    """One bound's summary over seeds: mass (all trials and fitted only), top-s precision, accuracy, fit, norm."""
    mass = [r["attn_mass"] for r in recs]
    fitted = [r["attn_mass"] for r in recs if r.get("fit", True)]
    med = lambda v: float(np.median(v)) if v else float("nan")  # noqa: E731
    return {"qk_bound": b, "cap": cap, "mass_median": med(mass), "mass_min": float(min(mass)),
            "mass_max": float(max(mass)), "mass_fitted_median": med(fitted), "mass_per_seed": {str(r["seed"]): r["attn_mass"] for r in recs},
            "mass_max_head_median": med([r.get("attn_mass_max", r["attn_mass"]) for r in recs]),
            "topk_median": med([r.get("attn_topk", float("nan")) for r in recs]),
            "test_acc_median": med([r["accuracy"] for r in recs]),
            "learned": sum(r["accuracy"] >= threshold for r in recs), "n": len(recs),
            "fit_rate": sum(bool(r.get("fit", True)) for r in recs) / len(recs),
            "norm_qk_median": med([r.get("norm_qk", float("nan")) for r in recs])}


def run_probe_bounds(cfg: Any, run: RunDir, section: dict[str, Any], device: str, resume: bool,
                     log: Callable[[str], None], learner_for: Callable[[Any, EnsembleConfig, str], Any],
                     info: Optional[DistInfo] = None) -> dict[str, Any]:
    """Train every seed at (T, m) under each bound of ``cfg.probe_bounds`` (``learner_for(cfg, ens, device)`` builds
    the batched learner of one bound's settings); the mass, accuracy and cap per bound."""
    info = info or DistInfo()
    T, m = broadcast_object(probe_point(section, cfg.probe_T, cfg.probe_m, cfg.search.m_max), info)
    base = cfg.bounded.bounds or Bounds(emb=None, qk=None, v=None, out=None)
    d_head = cfg.bounded.d_model // cfg.bounded.n_heads
    out: dict[str, Any] = {"T": T, "m": m, "s": cfg.s, "bound": "qk", "emb_bound": base.emb, "d_head": d_head,
                           "uniform_mass": cfg.s / (T + 1), "results": []}
    for b in cfg.probe_bounds:
        ens = EnsembleConfig(**{**asdict(cfg.bounded), "bounds": Bounds(**{**asdict(base), "qk": b})})
        store = TrialStore(run.file(PROBE_BOUNDS_FILE.format(b=b)), {**cfg.fingerprint("bounded"), "train": asdict(ens)},
                           resume=resume, write=info.is_main)
        lrn = distributed_learner(learner_for(cfg, ens, device), info)
        recs = _run_round(lrn, T, [(m, sd) for sd in cfg.seed_list()], store)
        row = _row(b, recs, mass_cap(T, cfg.s, base.emb, b, d_head), cfg.search.threshold)
        out["results"].append(row)
        log(f"probe qk<={b:g} at T={T}, m={m}: relevant mass median {row['mass_median']:.3f} "
            f"[{row['mass_min']:.3f}, {row['mass_max']:.3f}] (cap {row['cap']:.3f}, uniform {out['uniform_mass']:.4f}); "
            f"test acc {row['test_acc_median']:.3f}, learned {row['learned']}/{row['n']}, fit {row['fit_rate']:.2f}")
    return out
