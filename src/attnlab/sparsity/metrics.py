"""Sparsefinder metrics: sparsity, recall, exact fraction, cost, the authors' computation sparsity; Pareto fronts.

Definitions (per sequence b and head h; ``valid`` = pairs the model's mask allows (n(n+1)/2 for a causal
sequence of n tokens, n^2 bidirectional), ``n`` = number of queries with at least one valid key):

* sparsity   = 1 - |pred AND valid| / |valid|                (fraction of allowed pairs *not* predicted)
* recall     = |pred AND gold| / |gold|                       (fraction of gold entmax edges predicted)
* exact      = share of queries with a non-empty gold row whose gold keys are all predicted (row recall 1)
* cost       = (|pred AND valid| + predictor_ops) / |valid|   (pairs that must be scored, plus everything the
  predictor computes -- projections, distances, bucket sorting, top-k selection -- relative to dense attention
  over the valid pairs; ``predictor_ops`` is counted in *pair-score equivalents*: one unit is one d_head-dim
  dot product, so an r-dimensional distance costs r / d_head units and a scalar comparison 1 / d_head).
  Lower is better; 1 = as expensive as dense attention; predicting every valid pair at no cost gives 1.
* comp_sparsity = 1 - compute_ops / n^2                       (the Sparsefinder authors' "computation sparsity":
  score computations a bucketed kernel performs -- per bucket round, n_buckets x largest query bucket x largest
  key bucket -- plus the forced window; predictors without buckets compute their predicted pairs. Their code
  divides by n^2 also for causal attention; so do we, to stay comparable.)

Forced edges (window, CLS, ...) are part of ``pred`` and count toward sparsity, recall and cost.
Per head: mean over sequences (sequences without gold edges are skipped for recall/exact), then
averaged over layers. ``seq_recall`` / ``seq_sparsity`` keep the per-sequence means over heads, for error bars
across windows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from .graphs import check_gold, check_graphs, full_valid

METRICS = ("sparsity", "recall", "exact", "cost", "comp_sparsity")


@dataclass
class HeadMetrics:
    """Metrics per head (each a float64 tensor (H,)), averaged over the sequences of a batch."""

    sparsity: torch.Tensor
    recall: torch.Tensor
    exact: torch.Tensor
    cost: torch.Tensor
    comp_sparsity: torch.Tensor
    n_sequences: int = 0
    seq_recall: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.float64))
    seq_sparsity: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.float64))
    #: per (sequence, head) values (B, H) of each metric (NaN where undefined), in window order: what
    #: :func:`merge_batches` merges exactly, however the windows were split into batches or ranks
    per_seq: Optional[dict[str, torch.Tensor]] = None

    @classmethod
    def from_per_seq(cls, per_seq: dict[str, torch.Tensor]) -> "HeadMetrics":
        """Metrics of the sequences (B, H) per metric: per head the nanmean over sequences."""
        per_seq = {m: per_seq[m].double().cpu() for m in METRICS}
        return cls(*(_nanmean0(per_seq[m]) for m in METRICS), int(per_seq["recall"].shape[0]),
                   per_seq["recall"].nanmean(dim=1), per_seq["sparsity"].nanmean(dim=1), per_seq)

    def mean(self) -> dict[str, float]:
        """Mean over heads of each metric."""
        return {m: float(getattr(self, m).nanmean()) for m in METRICS}


def _nanmean0(x: torch.Tensor) -> torch.Tensor:
    """nanmean over dim 0 (sequences)."""
    return x.nanmean(dim=0)


def _per_bh(x, shape: tuple[int, int], device) -> torch.Tensor:
    """A scalar or (B, H) / (H,) tensor of per-(sequence, head) operation counts as float64 (B, H)."""
    t = torch.as_tensor(x, dtype=torch.float64, device=device)
    return t.expand(shape) if t.dim() < 2 else t


def graph_metrics(pred: torch.Tensor, gold: torch.Tensor, valid: Optional[torch.Tensor] = None,
                  predictor_ops: float | torch.Tensor = 0.0,
                  compute_ops: Optional[float | torch.Tensor] = None) -> HeadMetrics:
    """Sparsity, recall, exact fraction, cost and computation sparsity per head (see module docstring).

    ``pred``, ``gold``: bool (B, H, Nq, Nk) of the same shape; ``valid`` broadcastable to it (None = all
    valid); ``predictor_ops``: predictor cost per head and sequence in pair-score units (``Predictor.cost(n)``),
    a float or (B, H); ``compute_ops``: the authors' score computations per sequence and head (None = the
    predicted valid pairs).
    """
    check_graphs(pred, gold, valid)
    check_gold(gold)
    v = full_valid(valid, tuple(gold.shape), gold.device)
    p = pred.bool() & v
    g = gold.bool() & v
    n_valid = v.sum(dim=(-1, -2)).double()  # (B, H)
    n_pred = p.sum(dim=(-1, -2)).double()
    n_gold = g.sum(dim=(-1, -2)).double()
    hit = (p & g).sum(dim=-1).double()  # (B, H, Nq)
    gold_row = g.sum(dim=-1).double()
    nan = torch.tensor(float("nan"), dtype=torch.float64, device=gold.device)
    sparsity = torch.where(n_valid > 0, 1.0 - n_pred / n_valid.clamp(min=1), nan)
    recall = torch.where(n_gold > 0, hit.sum(-1) / n_gold.clamp(min=1), nan)
    rows = gold_row > 0
    exact_rows = ((hit == gold_row) & rows).sum(-1).double()
    exact = torch.where(rows.sum(-1) > 0, exact_rows / rows.sum(-1).clamp(min=1), nan)
    bh = tuple(n_valid.shape)
    cost = torch.where(n_valid > 0, (n_pred + _per_bh(predictor_ops, bh, gold.device)) / n_valid.clamp(min=1), nan)
    n = v.any(dim=-1).sum(dim=-1).double()  # unpadded length per (B, H)
    ops = n_pred if compute_ops is None else _per_bh(compute_ops, bh, gold.device)
    comp = torch.where(n > 0, 1.0 - ops / (n * n).clamp(min=1), nan)
    return HeadMetrics.from_per_seq({"sparsity": sparsity, "recall": recall, "exact": exact, "cost": cost,
                                     "comp_sparsity": comp})


def spread(x: torch.Tensor) -> dict[str, float]:
    """Mean, standard deviation and 95% normal half-width of the mean of a 1-D sample (NaNs dropped)."""
    x = x[~torch.isnan(x)].double()
    m = len(x)
    if m == 0:
        return {"mean": float("nan"), "std": float("nan"), "ci95": float("nan"), "n": 0}
    sd = float(x.std()) if m > 1 else 0.0
    return {"mean": float(x.mean()), "std": sd, "ci95": 1.96 * sd / math.sqrt(m), "n": m}


def average_layers(per_layer: Sequence[HeadMetrics]) -> dict:
    """Aggregate per-layer metrics: ``per_head`` (mean over layers), ``per_layer`` (mean over heads),
    ``grid`` (layer x head) and ``mean`` (over layers and heads) for each metric."""
    out: dict = {"mean": {}, "per_head": {}, "per_layer": {}, "grid": {}}
    for m in METRICS:
        grid = torch.stack([getattr(h, m) for h in per_layer])  # (L, H)
        out["grid"][m] = grid.tolist()
        out["per_head"][m] = grid.nanmean(dim=0).tolist()
        out["per_layer"][m] = grid.nanmean(dim=1).tolist()
        out["mean"][m] = float(grid.nanmean())
    if all(len(h.seq_recall) for h in per_layer):  # per window: mean over layers and heads -> spread over windows
        out["windows"] = {m: spread(torch.stack([getattr(h, f"seq_{m}") for h in per_layer]).nanmean(dim=0))
                          for m in ("recall", "sparsity")}
    return out


def merge_batches(parts: Sequence[HeadMetrics]) -> HeadMetrics:
    """Combine metrics of several batches (in window order): the per-head nanmean over all their sequences, exactly
    as one batch would give (parts without ``per_seq``: each batch's means weighted by its number of sequences)."""
    if all(p.per_seq is not None for p in parts):
        return HeadMetrics.from_per_seq({m: torch.cat([p.per_seq[m] for p in parts]) for m in METRICS})
    w = torch.tensor([p.n_sequences for p in parts], dtype=torch.float64)
    out = {}
    for m in METRICS:
        x = torch.stack([getattr(p, m) for p in parts])  # (P, H)
        ww = w[:, None].expand_as(x) * ~torch.isnan(x)
        out[m] = torch.nan_to_num(x) .mul(ww).sum(0) / ww.sum(0)
    return HeadMetrics(**out, n_sequences=int(w.sum()), seq_recall=torch.cat([p.seq_recall for p in parts]),
                       seq_sparsity=torch.cat([p.seq_sparsity for p in parts]))


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the non-dominated (sparsity, recall) points (both maximised), by increasing sparsity.

    A point is dominated if another has sparsity >= and recall >= with one strictly greater. NaN points
    are ignored; of identical points the first is kept.
    """
    idx = [i for i, (s, r) in enumerate(points) if s == s and r == r]
    front = []
    for i in idx:
        si, ri = points[i]
        dominated = any((points[j][0] >= si and points[j][1] >= ri and (points[j][0] > si or points[j][1] > ri))
                        or (points[j] == points[i] and j < i) for j in idx if j != i)
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: (points[i][0], -points[i][1]))


def recall_at_sparsity(points: Sequence[tuple[float, float]], target: float = 0.9) -> Optional[float]:
    """Recall at sparsity ``target`` by linear interpolation along the Pareto front.

    Between the two front points bracketing ``target`` the recall is interpolated linearly. If every point
    is sparser than ``target``, the best recall is returned (adding edges never lowers recall, so it is a
    lower bound); if no point reaches ``target`` sparsity, None.
    """
    front = [points[i] for i in pareto_front(points)]
    if not front or front[-1][0] < target:
        return None
    if front[0][0] >= target:
        return float(front[0][1])
    for (s0, r0), (s1, r1) in zip(front, front[1:]):
        if s0 <= target <= s1:
            if s1 == s0:
                return float(max(r0, r1))
            t = (target - s0) / (s1 - s0)
            return float(r0 + t * (r1 - r0))
    return None
