"""Intervals over windows for the ranks k90 / k95 / k99: a delete-one-group jackknife of the row statistics.

The windows are cut into G contiguous groups (by their index in the whole run, so any number of torchrun
processes gives the same groups); the collector keeps one row statistic per group. Replicate g merges every
group but g; the rank is read from its pooled spectrum as a fractional rank (where the explained-variance
curve crosses the level, linearly interpolated), so steps of one rank still give a spread. The interval is
point +- t(G-1) * jackknife se, read back as integer ranks.

What it is: the sampling spread of the rank at this number of windows. What it is not: the bias of finite
samples. The rank grows with the number of windows (the k90 of each half of the windows shows by how much),
and no resampling of these windows can say where it stops.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch

from .eigen import LEVELS, eigh_desc, explained_variance, rank_for
from .stats import StreamingCovariance, pooled_within

#: largest size of the per-group row statistics (G x layers x heads x N^2 float64) kept for the interval
SPREAD_MAX_BYTES = 2 << 30
CONFIDENCE = 0.95
METHOD = "delete-one-group jackknife over contiguous groups of windows (t interval)"
NOTE = ("sampling spread at this number of windows, not the bias of finite samples: the rank grows with the number "
        "of windows (compare the k90 of each half of the windows), which this interval does not include")


def window_groups(n_windows: int, groups: int, rank: int = 0, world: int = 1) -> torch.Tensor:
    """Group (0..groups-1) of each of this process's windows ``rank::world``: contiguous blocks of the whole run."""
    ids = torch.arange(n_windows, dtype=torch.int64) * groups // max(n_windows, 1)
    return ids[rank::world]


def groups_bytes(groups: int, layers: int, heads: int, seq_len: int) -> int:
    """Memory of the per-group row statistics (second moments and means, float64)."""
    return groups * layers * heads * (seq_len * seq_len + seq_len) * 8


def fractional_rank(curve: torch.Tensor, level: float) -> float:
    """The rank at which the explained-variance curve reaches ``level``, interpolated between integer ranks
    (``ceil`` of it is :func:`rank_for` up to ties)."""
    k = rank_for(curve, level)
    if k > len(curve):
        return float(k)
    prev = float(curve[k - 2]) if k >= 2 else 0.0
    step = float(curve[k - 1]) - prev
    frac = (level - prev) / step if step > 0 else 1.0
    return (k - 1) + min(max(frac, 0.0), 1.0)


def pooled_curve(stats: Sequence[StreamingCovariance]) -> torch.Tensor:
    """Explained-variance curve of the heads pooled with equal weight, computed as the point estimates are."""
    return explained_variance(eigh_desc(pooled_within(list(stats)))[0])


def _curve(cov: torch.Tensor) -> torch.Tensor:
    """Explained-variance curve from the eigenvalues alone (the replicates)."""
    return explained_variance(torch.linalg.eigvalsh(cov.double()).flip(0).clamp_min(0))


def jackknife(point: float, reps: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float, float, float, float]:
    """(lo, hi, se, bias): ``point`` +- t(G-1) se with the delete-one jackknife se of the G replicates ``reps``,
    and the jackknife's first-order bias estimate (G-1)(mean of reps - point) (exact for a bias ~ 1/windows)."""
    from scipy import stats

    g = len(reps)
    mean = sum(reps) / g
    se = math.sqrt((g - 1) / g * sum((r - mean) ** 2 for r in reps))
    t = float(stats.t.ppf(0.5 + confidence / 2, g - 1))
    return point - t * se, point + t * se, se, (g - 1) * (mean - point)


def rank_interval(point_curve: torch.Tensor, rep_curves: Sequence[torch.Tensor],
                  confidence: float = CONFIDENCE) -> dict[str, Any]:
    """{'k90': [lo, hi], ..., 'se': {'k90': se, ...}, 'bias': {...}}: integer ranks, always containing the point
    estimate; se and the first-order bias estimate in (fractional) ranks."""
    out: dict[str, Any] = {}
    ses: dict[str, float] = {}
    bias: dict[str, float] = {}
    n = len(point_curve)
    for level in LEVELS:
        key = f"k{round(level * 100)}"
        k = rank_for(point_curve, level)
        lo, hi, se, b = jackknife(fractional_rank(point_curve, level),
                                  [fractional_rank(c, level) for c in rep_curves], confidence)
        out[key] = [min(k, max(1, math.ceil(lo - 1e-9))), max(k, min(n, math.ceil(hi - 1e-9)))]
        ses[key], bias[key] = round(se, 4), round(b, 4)
    return {**out, "se": ses, "bias": bias}


def leave_one_out(parts: Sequence[StreamingCovariance]) -> list[StreamingCovariance]:
    """For each part, the merge of all the others (prefix and suffix merges: 3G merges, no subtraction)."""
    first = parts[0]

    def empty() -> StreamingCovariance:
        return StreamingCovariance(first.dim, first.diag_only, first.mean.device, first.groups)

    prefix, suffix = [empty()], [empty()]
    for p in parts[:-1]:
        prefix.append(_copy(prefix[-1]).merge(p))
    for p in reversed(parts[1:]):
        suffix.append(_copy(suffix[-1]).merge(p))
    return [_copy(prefix[g]).merge(suffix[len(parts) - 1 - g]) for g in range(len(parts))]


def _copy(st: StreamingCovariance) -> StreamingCovariance:
    out = StreamingCovariance(st.dim, st.diag_only, st.mean.device, st.groups)
    out.n, out.mean, out.m2 = st.n, st.mean.clone(), st.m2.clone()
    return out


def rank_spread(totals: dict[int, StreamingCovariance], groups: dict[int, list[StreamingCovariance]],
                confidence: float = CONFIDENCE) -> dict[str, Any]:
    """Jackknife intervals of the pooled and per-layer ranks from the per-layer totals (heads grouped) and
    the per-layer, per-window-group statistics; ``{'reason': ...}`` when fewer than two groups hold windows."""
    layers = list(totals)
    if not groups:
        return {"reason": "no per-group statistics were kept (--spread-groups 0, too large, or resumed from an "
                          "older checkpoint)"}
    n_groups = len(groups[layers[0]])
    used = [g for g in range(n_groups) if all(groups[l][g].n > 0 for l in layers)]
    if len(used) < 2:
        return {"reason": f"only {len(used)} group(s) of windows hold rows: no interval (use more --n-sequences)"}
    heads = range(totals[layers[0]].groups)
    point = {l: [totals[l].group(h) for h in heads] for l in layers}
    # replicate i of each layer reduced at once to its heads-pooled covariance (N x N): one layer's G
    # leave-one-out statistics are in memory at a time; all layers pooled = the mean of the layers' (H heads each)
    rep_covs = {l: [pooled_within([st.group(h) for h in heads]) for st in leave_one_out([groups[l][g] for g in used])]
                for l in layers}
    res: dict[str, Any] = {"method": METHOD, "confidence": confidence, "groups": len(used),
                           "rows_per_group": [groups[layers[0]][g].n for g in used]}
    res["pooled"] = rank_interval(pooled_curve([s for l in layers for s in point[l]]),
                                  [_curve(torch.stack([rep_covs[l][i] for l in layers]).mean(0))
                                   for i in range(len(used))], confidence)
    res["per_layer"] = {str(l): rank_interval(pooled_curve(point[l]), [_curve(c) for c in rep_covs[l]], confidence)
                        for l in layers}
    res["note"] = NOTE
    return res


def interval_of(spread: dict[str, Any] | None, key: str = "k90", layer: int | str | None = None) -> str:
    """'[lo, hi]' of one rank (pooled, or of ``layer``) from results' ``rank_interval``; '' when there is none."""
    part = (spread or {}).get("pooled") if layer is None else ((spread or {}).get("per_layer") or {}).get(str(layer))
    ci = (part or {}).get(key)
    return f"[{ci[0]}, {ci[1]}]" if ci else ""


def spread_line(res: dict[str, Any]) -> str:
    """One line on the pooled ranks' intervals and the halves' k90 (why there is none when there is none)."""
    sp = res.get("rank_interval")
    halves = ((res.get("noise_floor") or {}).get("k90_halves") or {}).get("pooled")
    half = f"; k90 of each half of the windows: {halves[0]} and {halves[1]}" if halves else ""
    if not sp:
        return f"no interval over windows (not computed: --spread-groups 0, or an older run){half}"
    if "reason" in sp:
        return f"no interval over windows ({sp['reason']}){half}"
    ks = ", ".join(f"{k} {interval_of(sp, k)}" for k in ("k90", "k95", "k99"))
    bias = (sp.get("pooled") or {}).get("bias", {}).get("k90")
    grow = f", first-order jackknife bias of k90 {bias:+.1f}" if bias is not None else ""
    pct = round(100 * sp["confidence"])
    return (f"{pct}% interval over windows ({sp['groups']}-group jackknife): {ks}{half}{grow} "
            "(the interval is the spread at this number of windows; k90 still grows with more windows)")
