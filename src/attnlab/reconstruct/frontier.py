"""Quality against total compute: worst-layer and mean TV of every method family over a grid of pair budgets and
proxy ranks, each point costed by :mod:`.cost`, evaluated on held-out windows in chunks (spread across chunks).

A family is one way of spending compute (e.g. "top-b from the proxy, no estimate"); its points vary the pair
budget b and the proxy rank r. Points whose total compute exceeds ``max_compute`` are not evaluated (listed with
their cost). :func:`best_at` picks the lowest worst-layer TV at or under a total-compute budget.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch

from ..errors import ConfigError
from .cost import check_compute, method_cost
from .estimators import estimator_kind
from .evaluate import Combo, Method, evaluate
from .fit import ReconstructionFit


@dataclass(frozen=True)
class Family:
    """One curve of the frontier: an estimator/selection pair; ``zero_pairs``: the pure proxy (b = 0, vary r)."""

    name: str
    estimator: str
    selection: str
    uses_rank: bool = False
    zero_pairs: bool = False


FAMILIES = {f.name: f for f in (
    Family("proxy-only", "proxy", "adaptive", True, True),  # low-rank proxy scores, no exact pairs
    Family("topb-none", "none", "adaptive", True),  # exact top-b from the proxy, sparse attention (no estimate)
    Family("topb-proxy", "proxy", "adaptive", True),  # exact top-b, proxy values elsewhere
    Family("topb-proxy+gaussian", "proxy+gaussian", "adaptive", True),  # + conditional Gaussian on the residual
    Family("gaussian-qr", "gaussian", "qr"),  # paper's Gaussian estimator, pivoted-QR columns (shared gains)
    Family("basis-leverage", "basis", "leverage"),  # paper's basis estimator, leverage columns (shared)
    Family("gaussian-random", "gaussian", "random"),  # Gaussian estimator, random pairs (per-row Cholesky)
    Family("local-none", "none", "local"),  # local window + first/last token, no estimate
)}
DEFAULT_FRACTIONS = (1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2)
DEFAULT_RANKS = (1, 2, 4, 8, 16)


def _point_label(f: Family, b: int, r: int) -> str:
    return f"{f.name} [b={b}" + (f", r={r}]" if f.uses_rank else "]")


def candidates(fit: ReconstructionFit, families: Optional[list[str]] = None, fractions=DEFAULT_FRACTIONS,
               ranks=DEFAULT_RANKS, max_compute: float = 1.0, proxy: str = "bilinear",
               seed: int = 0) -> tuple[list[tuple[str, Method, dict[str, Any]]], list[dict[str, Any]]]:
    """(family, method, cost) for every grid point within ``max_compute``, and the skipped points with their cost."""
    n, d = fit.seq_len, int(fit.meta.get("d_head") or 0)
    if d < 1:
        raise ConfigError("the compute frontier needs d_head: fit from a corpus, not from a spectrum run")
    names = list(FAMILIES) if families is None else families
    resid = {int(p[1]) for p in fit.meta.get("residual_proxies", [])}
    budgets = sorted({max(1, min(n, int(round(f * n)))) for f in fractions})
    rks = sorted({int(r) for r in ranks if 1 <= int(r) <= d})
    out, skipped = [], []
    for name in names:
        if name not in FAMILIES:
            raise ConfigError(f"--families: unknown {name!r} (choose from {', '.join(FAMILIES)})")
        f = FAMILIES[name]
        for b in ([0] if f.zero_pairs else budgets):
            for r in (rks if f.uses_rank else [rks[0] if rks else 1]):
                if estimator_kind(f.estimator).needs_residual and r not in resid:
                    continue
                m = Method(fit, Combo(f.estimator, f.selection), b, proxy=proxy, proxy_rank=r, seed=seed,
                           name=_point_label(f, b, r))
                c = method_cost(m, d)
                if c["compute"] > max_compute:
                    skipped.append({"family": name, "label": m.label, "compute": c["compute"]})
                    continue
                out.append((name, m, c))
    return out, skipped


def _summ(xs: list[float]) -> dict[str, float]:
    t = torch.tensor(xs, dtype=torch.float64)
    return {"mean": float(t.mean()), "std": float(t.std()) if len(xs) > 1 else 0.0, "min": float(t.min()),
            "max": float(t.max())}


def evaluate_points(model, windows: torch.Tensor, points: list[tuple[str, Method, dict[str, Any]]],
                    chunks: int = 4, batch_size: int = 8, layers: Optional[list[int]] = None,
                    heads: Optional[list[int]] = None, progress: bool = False) -> dict[str, Any]:
    """Evaluate every point on ``chunks`` disjoint groups of held-out windows; TV means with spread across groups."""
    if not points:
        return {}
    chunks = max(1, min(chunks, len(windows)))
    size = math.ceil(len(windows) / chunks)
    per_chunk = []
    methods = [m for _, m, _ in points]
    for i in range(0, len(windows), size):
        per_chunk.append(evaluate(model, windows[i:i + size], methods, layers, heads, batch_size, progress=progress))
    out = {}
    for fam, m, c in points:
        lab = m.label
        worst = [max(v["tv"] for v in t[lab]["per_layer"].values()) for t in per_chunk]
        mean = [t[lab]["mean"]["tv"] for t in per_chunk]
        n_layers = len(per_chunk[0][lab]["per_layer"])
        per_layer = {l: sum(t[lab]["per_layer"][l]["tv"] for t in per_chunk) / len(per_chunk)
                     for l in per_chunk[0][lab]["per_layer"]}
        out[lab] = {"family": fam, "estimator": m.combo.estimator, "selection": m.combo.selection,
                    "budget_pairs": m.b, "pair_fraction": c["pair_fraction"], "proxy_rank": c["proxy_rank"],
                    "compute": c["compute"], "cost": c, "worst_layer_tv": _summ(worst), "mean_tv": _summ(mean),
                    "per_layer_tv": per_layer, "worst_layer_tv_pooled": max(per_layer.values()),
                    "n_chunks": len(per_chunk), "n_layers": n_layers}
    return out


def best_at(points: dict[str, Any], compute: float, key: str = "worst_layer_tv_pooled") -> Optional[str]:
    """Label of the lowest-TV point with total compute <= ``compute`` (None if there is none)."""
    check_compute(compute)
    ok = {k: v for k, v in points.items() if v["compute"] <= compute + 1e-12}
    return min(ok, key=lambda k: ok[k][key]) if ok else None


def require_affordable(fit: ReconstructionFit, compute: float, families: Optional[list[str]] = None,
                       fractions=DEFAULT_FRACTIONS, ranks=DEFAULT_RANKS) -> None:
    """Raise a ConfigError naming the cheapest method and its cost when nothing fits under ``compute``."""
    check_compute(compute)
    pts, skipped = candidates(fit, families, fractions, ranks, max_compute=float("inf"))
    costs = sorted((c["compute"], m.label) for _, m, c in pts)
    if not costs or costs[0][0] > compute:
        cheapest = f"{costs[0][1]} at {costs[0][0]:.3f}" if costs else "none"
        raise ConfigError(f"--compute {compute}: no method fits this total-compute budget; the cheapest is {cheapest} "
                          "of the dense QK^T cost")


def frontier_curves(points: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Per family, its points sorted by compute, keeping only those that improve on every cheaper point (Pareto)."""
    fam: dict[str, list] = {}
    for lab, v in points.items():
        fam.setdefault(v["family"], []).append({"label": lab, **{k: v[k] for k in (
            "compute", "budget_pairs", "proxy_rank", "worst_layer_tv", "mean_tv", "worst_layer_tv_pooled")}})
    out = {}
    for f, pts in fam.items():
        pts.sort(key=lambda p: (p["compute"], p["worst_layer_tv_pooled"]))
        best, keep = float("inf"), []
        for p in pts:
            if p["worst_layer_tv_pooled"] < best:
                keep.append(p)
                best = p["worst_layer_tv_pooled"]
        out[f] = keep
    return out


def format_frontier(points: dict[str, Any], levels=(0.25, 0.5)) -> str:
    """Plain-text table of the frontier (Pareto points per family) plus the best method at each compute level."""
    head = f"{'family / point':46s} {'compute':>7s} {'pairs':>6s}  {'worst-layer TV (mean±sd)':>24s}  {'mean TV':>8s}"
    lines = [head, "-" * len(head)]
    for fam, pts in frontier_curves(points).items():
        for p in pts:
            w, m = p["worst_layer_tv"], p["mean_tv"]
            lines.append(f"{p['label']:46s} {p['compute']:7.3f} {p['budget_pairs']:6d}  "
                         f"{w['mean']:.4f} ± {w['std']:.4f} (pooled {p['worst_layer_tv_pooled']:.4f})  {m['mean']:8.4f}")
    for c in levels:
        b = best_at(points, c)
        lines.append(f"best at compute <= {c}: " + ("none" if b is None else
                     f"{b}  worst-layer TV {points[b]['worst_layer_tv_pooled']:.4f} (compute {points[b]['compute']:.3f})"))
    return "\n".join(lines)
