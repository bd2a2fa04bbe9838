"""``proxy``: unobserved scores from the low-rank proxy, shifted so that the row keeps its exact mean (or, with the
offset estimated, by the mean observed difference to the proxy); no fitted statistics. And its cost."""

from __future__ import annotations

from typing import Any, Optional

import torch

from ...errors import ConfigError
from ..cost_shape import CostShape
from .base import EstimatorKind, register_estimator


class ProxyFill:
    """The proxy estimator of one head (stateless)."""

    def estimate(self, scores: torch.Tensor, idx: torch.Tensor, valid: Optional[torch.Tensor] = None,
                 row_mean: Optional[torch.Tensor] = None, proxy: Optional[torch.Tensor] = None) -> torch.Tensor:
        """:class:`~.base.HeadEstimator` protocol: observed pairs exact, the rest proxy + shift, -inf where masked."""
        if proxy is None:
            raise ConfigError("the proxy estimator needs the proxy scores of every pair")
        ps = proxy.to(scores.dtype)  # (B, N, N)
        B, nq, n = scores.shape
        v = torch.ones_like(scores, dtype=torch.bool) if valid is None else valid.expand(B, nq, n)
        full = idx.expand(B, nq, -1) if idx.dim() < 3 else idx
        obs_mask = torch.zeros_like(v).scatter(-1, full, True)
        unobs = v & ~obs_mask
        s0 = torch.where(v, scores, torch.zeros_like(scores))
        if row_mean is None:  # estimate the shift from the observed pairs
            shift = ((s0 - ps) * (obs_mask & v)).sum(-1) / (obs_mask & v).sum(-1).clamp_min(1)
        else:
            n_unobs = unobs.sum(-1).clamp_min(1)
            target = row_mean * v.sum(-1) - (s0 * (obs_mask & v)).sum(-1)  # exact total of the unobserved scores
            shift = (target - (ps * unobs).sum(-1)) / n_unobs
        est = torch.where(obs_mask, scores, ps + shift.unsqueeze(-1))
        return est.masked_fill(~v, float("-inf"))


@register_estimator
class ProxyKind(EstimatorKind):
    """Registry entry of ``proxy``."""

    name = "proxy"
    help = "the low-rank proxy scores, shifted to the exact row mean"
    tags = ("proxy",)

    def build(self, method: Any, layer: int, head: int) -> ProxyFill:
        """Nothing fitted: the same fill for every head."""
        return ProxyFill()

    def cost(self, s: CostShape) -> dict[str, float]:
        """Shift: sums of the proxy over the unobserved and of the exact observed scores (n), then u adds."""
        return {"per_row": float(s.n + s.u), "setup": 0.0}
