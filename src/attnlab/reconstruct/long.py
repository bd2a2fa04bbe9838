"""Reconstruction at long context (2k-64k tokens) on causal LMs, one chunk of query rows at a time.

The corpus path (:mod:`.fit`, :mod:`.evaluate`) keeps the paper's sufficient statistics: a row mean per query
position and a row covariance, ``2 * 8 N^2`` bytes per head (16 GiB per head at N = 32k), and scores of every row
of a window at once. That is what stops ``attnlab reconstruct run`` beyond a few thousand tokens. This module
never forms an N x N array. Per (layer, head) it holds, besides q and k of the captured windows (``2 B N d`` floats):

- **evaluation**: one chunk of ``c`` held-out query rows of ``B`` windows against all N keys at a time; peak
  ``B c N`` elements per tensor and ``(EVAL_BASE + EVAL_PER_RANK * n_ranks) * B * c * N * itemsize`` bytes in all
  (:func:`eval_peak_bytes`; proxy scores, their ranks and sort indices are kept per proxy rank within a chunk;
  int64 indices count as two float32 buffers). On an H200 at N = 2k/8k/32k, B = 4, c = 256, 4 ranks, float32 the
  measured peak was 0.262 / 1.10 / 4.41 GB against 0.277 / 1.11 / 4.43 GB from the formula;
- **row spectrum**: ``R`` rows sampled from the fit windows, accumulated as their R x R Gram matrix one tile of
  ``R`` rows x ``kc`` keys at a time: ``(3 R^2 + SPEC_BUFFERS * R * kc + W N d) * itemsize`` bytes (the Gram, its
  scaled copy and the eigensolver's workspace; the tiles; the fit windows' prefix key means;
  :func:`spectrum_peak_bytes`; measured 0.13 / 0.18 / 0.19 GB at 2k / 8k / 32k with R = 2048, kc = 4096).
  Eigenvalues of the row covariance (N x N) equal those of the centred Gram (R x R), so k90/k95/k99 are exact
  for the sampled rows (at most R - 1 nonzero; a level reached only at k >= R / 2 is flagged ``saturated``).

Causal rows have different lengths: row i sees keys 0..i (``n_i = i + 1``). Rows are centred over their valid
keys (masked entries 0, as in :mod:`attnlab.spectral`), budgets are per row, ``b_i = ceil(f n_i)`` exact pairs,
and compute is the causal total: the sum over rows of :func:`attnlab.reconstruct.cost.cost_breakdown` at
(n_i, b_i) over the dense causal cost ``sum_i n_i d`` (:func:`causal_cost`). Rows with ``b_i >= n_i`` are exact.

Method families evaluated here (no N x N statistics): ``proxy-only`` (rank-r bilinear proxy, shifted to the exact
row mean), ``topb-none`` (exact top-b_i by the proxy, sparse softmax), ``topb-proxy`` (exact top-b_i, proxy
elsewhere, exact row mean kept), ``local-none`` (first token + the b_i - 1 nearest past keys), ``local-proxy``
(that, proxy elsewhere), ``hybrid-none`` / ``hybrid-proxy`` (ceil(b_i / 2) keys local as above, the rest the
proxy's top keys among the others) and the reference ``oracle-none`` (top-b_i by the true scores; needs every
score). The paper's Gaussian and basis estimators and proxy+gaussian are costed on causal rows at their cheapest
grid point (:data:`COSTED_ONLY`, :func:`costed_only`), not evaluated: at N >= 8k that cost alone exceeds 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from ..errors import ConfigError
from .cost import cost_breakdown
from .long_rows import (  # noqa: F401  (re-exported: capture, causal rows and the row spectrum live there)
    LEVELS,
    Captured,
    _check_causal,
    capture_qk,
    causal_chunk,
    head_spectrum,
    prefix_key_mean,
    rank_at,
    sample_rows,
    spectrum_summary,
)
from .selection import Proxy, make_proxy

EVAL_BASE = 13  # (B, c, N) float-sized buffers of one chunk besides the proxy's (scores, probs, masks, estimates, sorts)
EVAL_PER_RANK = 5  # per proxy rank: its scores (1), key ranks (int64: 2), sort indices (int64: 2)
SPEC_BUFFERS = 5  # (R, kc) tiles of the spectrum live at once (scores, mask, centred tiles, concatenation, centring)


@dataclass(frozen=True)
class LongFamily:
    """One frontier curve: how the exact pairs are chosen and what fills the rest."""

    name: str
    selection: str  # adaptive (top-b by proxy) | local | oracle | none
    fill: str  # none (masked) | proxy (proxy scores shifted to the exact row mean)
    uses_rank: bool
    cost_estimator: str  # names in cost.ESTIMATOR_COSTS / SELECTION_COSTS
    cost_selection: str


FAMILIES: dict[str, LongFamily] = {f.name: f for f in (
    LongFamily("proxy-only", "none", "proxy", True, "proxy", "none"),
    LongFamily("topb-none", "adaptive", "none", True, "none", "adaptive"),
    LongFamily("topb-proxy", "adaptive", "proxy", True, "proxy", "adaptive"),
    LongFamily("local-none", "local", "none", False, "none", "local"),
    LongFamily("local-proxy", "local", "proxy", True, "proxy", "local"),
    LongFamily("hybrid-none", "hybrid", "none", True, "none", "adaptive"),
    LongFamily("hybrid-proxy", "hybrid", "proxy", True, "proxy", "adaptive"),
    LongFamily("oracle-none", "oracle", "none", False, "none", "oracle"),
)}
#: Families of the corpus path that need N x N statistics: costed on causal rows, not evaluated here.
COSTED_ONLY = {"gaussian-qr": ("gaussian", "qr"), "gaussian-random": ("gaussian", "random"),
               "basis-leverage": ("basis", "leverage"), "topb-proxy+gaussian": ("proxy+gaussian", "adaptive")}


def eval_peak_bytes(batch: int, chunk: int, n: int, itemsize: int = 4, n_ranks: int = 4) -> int:
    """Peak bytes of the evaluation per head: (EVAL_BASE + EVAL_PER_RANK * n_ranks) * B * c * N * itemsize."""
    return (EVAL_BASE + EVAL_PER_RANK * n_ranks) * batch * chunk * n * itemsize


def spectrum_peak_bytes(rows: int, key_chunk: int, itemsize: int = 4, windows: int = 0, n: int = 0, d: int = 0) -> int:
    """Peak bytes of the spectrum per head: (3 R^2 + SPEC_BUFFERS * R * kc + W N d) * itemsize."""
    return (3 * rows * rows + SPEC_BUFFERS * rows * key_chunk + windows * n * d) * itemsize


def row_budgets(frac: float, n_rows: torch.Tensor) -> torch.Tensor:
    """Exact pairs of causal rows of lengths ``n_rows``: ceil(frac * n_i), in [1, n_i] (frac = 0: none)."""
    if not 0.0 <= frac <= 1.0:
        raise ConfigError(f"--fractions: a pair fraction must be in [0, 1] (got {frac})")
    if frac == 0:
        return torch.zeros_like(n_rows)
    return torch.ceil(frac * n_rows.double() - 1e-9).long().clamp(1).minimum(n_rows)


def causal_cost(estimator: str, selection: str, n: int, d: int, frac: float, r: int = 0, k: float = 0,
                strata: int = 256) -> dict[str, Any]:
    """Total compute of a method over the causal rows of a length-``n`` window, as a fraction of dense causal
    QK^T (sum_i n_i d, n_i = i + 1): rows with b_i >= n_i cost n_i d (exact), the others cost_breakdown(n_i, b_i).
    Rows are grouped in ``strata`` runs of equal size, each costed at its middle length (exact for n <= strata)."""
    if n < 1 or d < 1:
        raise ConfigError(f"causal cost needs n >= 1 and d >= 1 (got {n}, {d})")
    lengths = torch.arange(1, n + 1)
    groups = lengths.tensor_split(min(strata, n))
    total, dense, items = 0.0, 0.0, {}
    for g in groups:
        m = int(g[len(g) // 2])
        cnt = len(g)
        b = int(row_budgets(frac, torch.tensor([m]))[0])
        dense += float(g.sum()) * d
        if b >= m and selection != "oracle":
            part = {"exact_pairs": float(m * d)}
        else:
            part = cost_breakdown(estimator, selection, m, d, min(b, m), r, k)["per_row_macs"]
        scale = float(g.sum()) / (m * cnt)  # the stratum's mean length over its middle one (affine items)
        for key, v in part.items():
            items[key] = items.get(key, 0.0) + v * cnt * scale
            total += v * cnt * scale
    return {"compute": total / dense, "fractions": {k_: v / dense for k_, v in items.items()}, "pair_fraction": frac,
            "proxy_rank": r or None, "reference_only": selection == "oracle"}


# ------------------------------------------------------------------------------------------------------------
# Evaluation
# ------------------------------------------------------------------------------------------------------------


def fit_proxy(q: torch.Tensor, k: torch.Tensor, rank: int, seed: int = 0) -> Proxy:
    """Bilinear rank-r proxy from the fit windows' query and (within-window centred) key second moments."""
    qq = q.double().reshape(-1, q.shape[-1])
    kc = (k.double() - k.double().mean(-2, keepdim=True)).reshape(-1, k.shape[-1])
    return make_proxy("bilinear", rank, q.shape[-1], qq.T @ qq / len(qq), kc.T @ kc / len(kc), seed=seed)


def _ranks_of(order_by: torch.Tensor) -> torch.Tensor:
    """Rank (0 = largest) of every key in its row; -inf entries rank last."""
    order = torch.sort(order_by, dim=-1, descending=True, stable=True).indices
    ranks = torch.empty_like(order)
    ranks.scatter_(-1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order))
    return ranks


def _local(keys: torch.Tensor, rows: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(c, N): the first key plus the b - 1 nearest past keys of every row (b (c, 1) pairs per row)."""
    return (keys.unsqueeze(0) == 0) | (keys.unsqueeze(0) > rows.unsqueeze(1) - b + 1)


def _tv(p: torch.Tensor, est: torch.Tensor) -> torch.Tensor:
    q = torch.nan_to_num(torch.softmax(est, -1), nan=0.0)
    return 0.5 * (p - q).abs().sum(-1)  # (B, c)


def _proxy_fill(s, ps, sel, valid, rmean, n_i):
    """Proxy scores on the unselected valid keys, shifted so the row's total equals n_i * exact row mean."""
    unsel = valid & ~sel
    s0 = torch.where(sel, s, torch.zeros_like(s))
    p0 = torch.where(unsel, ps, torch.zeros_like(ps))
    shift = (n_i * rmean - s0.sum(-1) - p0.sum(-1)) / unsel.sum(-1).clamp_min(1)
    est = torch.where(sel, s, ps + shift.unsqueeze(-1))
    return est.masked_fill(~valid, float("-inf"))


@dataclass(frozen=True)
class Point:
    """One evaluated method: family, pair fraction, proxy rank."""

    family: str
    frac: float
    rank: int = 0

    @property
    def label(self) -> str:
        """e.g. 'topb-proxy [f=0.125, r=4]'."""
        return f"{self.family} [f={self.frac:.4g}" + (f", r={self.rank}]" if self.rank else "]")


def points_for(families, fractions, ranks, n: int, d: int, max_compute: float) -> tuple[list[Point], list[dict]]:
    """Grid points within ``max_compute`` (causal cost) and the skipped ones (with their cost)."""
    pts, skipped = [], []
    for name in families:
        if name not in FAMILIES:
            raise ConfigError(f"--families: unknown {name!r} (choose from {', '.join(FAMILIES)})")
        f = FAMILIES[name]
        for fr in ([0.0] if f.selection == "none" else fractions):
            for r in (ranks if f.uses_rank else [0]):
                p = Point(name, float(fr), int(r))
                c = causal_cost(f.cost_estimator, f.cost_selection, n, d, p.frac, p.rank)
                if c["compute"] > max_compute and name != "oracle-none":
                    skipped.append({"label": p.label, "compute": c["compute"]})
                    continue
                pts.append(p)
    return pts, skipped


def _selection(kind: str, rank: int, s: torch.Tensor, ps: Optional[torch.Tensor], b: torch.Tensor, keys: torch.Tensor,
               rows: torch.Tensor, cache: dict[Any, torch.Tensor]) -> torch.Tensor:
    """The exact pairs (W, c, N) of one chunk for selection ``kind``: none, adaptive (the proxy's top b_i), oracle
    (the true top b_i), local, or hybrid (ceil(b/2) local keys, then the proxy's top floor(b/2) of the others).
    ``cache`` keeps the key orders of the chunk across points."""
    if kind == "none":
        return torch.zeros_like(s, dtype=torch.bool)
    if kind == "adaptive":
        if ("order", rank) not in cache:
            cache[("order", rank)] = _ranks_of(ps)
        return cache[("order", rank)] < b
    if kind == "oracle":
        if "true" not in cache:
            cache["true"] = _ranks_of(s)
        return cache["true"] < b
    if kind == "local":
        return _local(keys, rows, b).expand_as(s)
    if ("sorted", rank) not in cache:
        cache[("sorted", rank)] = torch.sort(ps, dim=-1, descending=True, stable=True).indices
    idx = cache[("sorted", rank)]
    bl = b - b // 2
    loc = _local(keys, rows, bl).expand_as(s)
    loc_sorted = torch.gather(loc, -1, idx)
    before = torch.cumsum(loc_sorted, -1) - loc_sorted.long()  # local keys ranked above each position
    pos = torch.arange(s.shape[-1], device=s.device)
    pick = ~loc_sorted & (pos - before < (b - bl))
    return loc | torch.zeros_like(loc).scatter(-1, idx, pick)


def evaluate_head(q: torch.Tensor, k: torch.Tensor, rows: list[torch.Tensor], scaling: float, points: list[Point],
                  proxies: dict[int, Proxy], chunk: int = 256,
                  on_chunk: Optional[Callable[[int], None]] = None) -> dict[str, torch.Tensor]:
    """Mean TV per window (W,) of every point for one head: q, k (W, N, d) held-out windows, ``rows`` the query
    positions evaluated (the same for every window), chunks of ``chunk`` rows (``on_chunk(numel)`` sees each)."""
    W, n, _ = k.shape
    kbar = prefix_key_mean(k)
    rows_all = rows[0].to(q.device)
    sums = {p.label: torch.zeros(W, dtype=torch.float64, device=q.device) for p in points}
    keys = torch.arange(n, device=q.device)
    for a in range(0, len(rows_all), chunk):
        r = rows_all[a:a + chunk]
        s = causal_chunk(q, k, r, scaling)  # (W, c, N)
        if on_chunk is not None:
            on_chunk(s.numel())
        valid = keys.unsqueeze(0) <= r.unsqueeze(1)  # (c, N)
        n_i = (r + 1).to(s.dtype)  # (c,)
        rmean = (q[:, r] * kbar[:, r]).sum(-1) * scaling  # (W, c)
        p = torch.softmax(s, -1)
        by_rank: dict[int, torch.Tensor] = {}
        cache: dict[Any, torch.Tensor] = {}  # per-chunk key orders: the true scores' and each proxy rank's
        for pt in points:
            fam = FAMILIES[pt.family]
            b = row_budgets(pt.frac, r + 1).unsqueeze(-1)  # (c, 1)
            ps = None
            if fam.uses_rank:
                if pt.rank not in by_rank:
                    px = proxies[pt.rank]  # proxy scores in the working dtype (float64 in CPU checks)
                    wq, wk = px.wq.to(q.device, s.dtype), px.wk.to(q.device, s.dtype)
                    by_rank[pt.rank] = (((q[:, r] @ wq) @ (k @ wk).transpose(-1, -2)) * scaling).masked_fill(
                        ~valid, float("-inf"))
                ps = by_rank[pt.rank]
            sel = _selection(fam.selection, pt.rank, s, ps, b, keys, r, cache)
            sel = sel & valid
            if fam.fill == "none":
                est = s.masked_fill(~sel, float("-inf"))
            else:
                est = _proxy_fill(s, torch.where(valid, ps, torch.zeros_like(ps)), sel, valid, rmean, n_i)
            sums[pt.label] += _tv(p, est).double().sum(-1)
            del sel, est
        del s, p, by_rank, cache
    return {lab: v.cpu() / len(rows_all) for lab, v in sums.items()}


def summarise(tv: dict[tuple[int, int], dict[str, torch.Tensor]], layers: list[int], heads: list[int],
              points: list[Point], n: int, d: int) -> dict[str, Any]:
    """Per point: worst-layer TV per held-out window (mean, sd, min, max), pooled worst layer, per-layer TV, cost."""
    out = {}
    for pt in points:
        per_layer_w = torch.stack([torch.stack([tv[(l, h)][pt.label] for h in heads]).mean(0) for l in layers])  # (L, W)
        worst = per_layer_w.max(0).values  # (W,)
        fam = FAMILIES[pt.family]
        c = causal_cost(fam.cost_estimator, fam.cost_selection, n, d, pt.frac, pt.rank)
        out[pt.label] = {
            "family": pt.family, "pair_fraction": pt.frac, "proxy_rank": pt.rank or None, "compute": c["compute"],
            "cost": c, "worst_layer_tv": _spread(worst), "mean_tv": _spread(per_layer_w.mean(0)),
            "worst_layer_tv_pooled": float(per_layer_w.mean(1).max()),
            "per_layer_tv": {str(l): float(per_layer_w[i].mean()) for i, l in enumerate(layers)}}
    return out


def _spread(x: torch.Tensor) -> dict[str, float]:
    x = x.double()
    return {"mean": float(x.mean()), "sd": float(x.std()) if len(x) > 1 else 0.0, "min": float(x.min()),
            "max": float(x.max()), "n": len(x)}


def best_at(points: dict[str, Any], compute: float, exclude=("oracle-none",)) -> Optional[str]:
    """Lowest pooled worst-layer TV at total compute <= ``compute`` (the reference oracle excluded)."""
    ok = {k: v for k, v in points.items() if v["compute"] <= compute + 1e-12 and v["family"] not in exclude}
    return min(ok, key=lambda k: ok[k]["worst_layer_tv_pooled"]) if ok else None


def costed_only(n: int, d: int, spectra: dict[str, dict], fractions, ranks) -> dict[str, Any]:
    """Causal cost of the N x N-statistics families at their cheapest grid point (basis at k = mean k90)."""
    k90 = sum(v["k90"] for v in spectra.values()) / max(len(spectra), 1) if spectra else 8
    out = {}
    for name, (est, sel) in COSTED_ONLY.items():
        r = min(ranks) if sel == "adaptive" or est == "proxy+gaussian" else 0
        fr = min(fractions)
        kk = min(k90, max(1, math.ceil(fr * n))) if est == "basis" else 0
        c = causal_cost(est, sel, n, d, fr, r, kk)
        out[name] = {"cheapest_fraction": fr, "proxy_rank": r or None, "basis_k": kk or None, "compute": c["compute"],
                     "why": "needs N x N row statistics (16 N^2 bytes per head); not evaluated at long context"}
    return out
