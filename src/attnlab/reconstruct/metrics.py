"""Error metrics between true and reconstructed score rows (one head, rows over the last axis).

All take scores with -inf at keys the model masks; rows with no valid key are skipped by the
aggregating :class:`MetricSums`.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..errors import ConfigError, ShapeError

METRICS = ("tv", "kl", "rel_err", "top1", "topk")


def _probs(scores: torch.Tensor) -> torch.Tensor:
    p = torch.softmax(scores.double(), dim=-1)
    return torch.nan_to_num(p, nan=0.0)


def total_variation(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """0.5 * sum |p - q| over the last axis (probabilities)."""
    if p.shape != q.shape:
        raise ShapeError(f"shapes differ: {tuple(p.shape)} vs {tuple(q.shape)}")
    return 0.5 * (p - q).abs().sum(-1)


def kl_divergence(p: torch.Tensor, q: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """KL(p || q) over the last axis; q is floored at ``eps`` where p > 0."""
    if p.shape != q.shape:
        raise ShapeError(f"shapes differ: {tuple(p.shape)} vs {tuple(q.shape)}")
    pos = p > 0
    ratio = torch.where(pos, p / q.clamp_min(eps), torch.ones_like(p))
    return (torch.where(pos, p * ratio.log(), torch.zeros_like(p))).sum(-1)


def _centre(s: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    z = torch.where(valid, s, torch.zeros_like(s))
    m = z.sum(-1, keepdim=True) / valid.sum(-1, keepdim=True).clamp_min(1)
    return torch.where(valid, s - m, torch.zeros_like(s))


def relative_error(true: torch.Tensor, est: torch.Tensor, valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """||c(true) - c(est)|| / ||c(true)|| per row on row-centred valid scores (softmax-relevant part).

    Entries the estimate leaves at -inf while valid (the 'none' estimator) give inf."""
    v = torch.isfinite(true) if valid is None else valid.expand_as(true)
    t, e = true.double(), est.double()
    bad = (v & ~torch.isfinite(e)).any(-1)
    e = torch.where(torch.isfinite(e), e, torch.zeros_like(e))
    ct, ce = _centre(t, v), _centre(e, v)
    num = (ct - ce).norm(dim=-1)
    den = ct.norm(dim=-1).clamp_min(1e-12)
    return torch.where(bad, torch.full_like(num, float("inf")), num / den)


def topk_agreement(p: torch.Tensor, q: torch.Tensor, k: int = 1) -> torch.Tensor:
    """Share of the top-k keys of p found among the top-k keys of q (k=1: argmax agreement)."""
    n = p.shape[-1]
    if not 1 <= k <= n:
        raise ConfigError(f"--topk {k} must be in [1, {n}]")
    a = p.topk(k, -1).indices
    b = q.topk(k, -1).indices
    hit = (a.unsqueeze(-1) == b.unsqueeze(-2)).any(-1)
    return hit.double().mean(-1)


def row_metrics(true: torch.Tensor, est: torch.Tensor, valid: Optional[torch.Tensor] = None, topk: int = 5) -> dict[str, torch.Tensor]:
    """Every metric per row for score tensors (..., N) (-inf where masked)."""
    p, q = _probs(true), _probs(est)
    k = min(topk, true.shape[-1])
    return {"tv": total_variation(p, q), "kl": kl_divergence(p, q), "rel_err": relative_error(true, est, valid),
            "top1": topk_agreement(p, q, 1), "topk": topk_agreement(p, q, k)}


class MetricSums:
    """Running sums of per-row metrics keyed by anything (e.g. (layer, head)); ``means()`` gives averages."""

    def __init__(self) -> None:
        self.sums: dict = {}
        self.counts: dict = {}

    def add(self, key, rows: dict[str, torch.Tensor], row_ok: Optional[torch.Tensor] = None) -> None:
        """Add per-row values; ``row_ok`` (bool, same shape) keeps only rows with a valid key."""
        acc = self.sums.setdefault(key, {m: 0.0 for m in rows})
        for m, v in rows.items():
            v = v if row_ok is None else v[row_ok]
            acc[m] = acc.get(m, 0.0) + float(v.double().sum())
        n = int(next(iter(rows.values())).numel() if row_ok is None else int(row_ok.sum()))
        self.counts[key] = self.counts.get(key, 0) + n

    def merge_ranks(self, info) -> None:
        """Sum every rank's sums and counts into this one (torchrun; ranks without rows contribute nothing)."""
        from ..distributed import gather_lists

        parts = gather_lists([(self.sums, self.counts)], info, to_all=True)
        self.sums, self.counts = {}, {}
        for sums, counts in parts:  # rank order: the same float additions on every rank
            for k, acc in sums.items():
                mine = self.sums.setdefault(k, {})
                for m, v in acc.items():
                    mine[m] = mine.get(m, 0.0) + v
                self.counts[k] = self.counts.get(k, 0) + counts[k]

    def means(self) -> dict:
        """Per-key metric means."""
        return {k: {m: v / max(self.counts[k], 1) for m, v in acc.items()} for k, acc in self.sums.items()}
