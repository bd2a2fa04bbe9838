"""``mean``: unobserved entries are the fitted mean row shifted to the row (mu_R + m), and its cost."""

from __future__ import annotations

import torch

from ..cost_shape import CostShape
from .base import register_estimator
from .row import Estimator, RowModelKind


class MeanEstimator(Estimator):
    """The fitted mean row, shifted by the exact row mean or by the mean observed residual."""

    def _chunk(self, r, idx, mu, ok, shared, known) -> torch.Tensor:
        if known:
            return mu
        w = torch.ones_like(r) if ok is None else ok.to(r.dtype)
        m = (r * w).sum(-1) / w.sum(-1).clamp_min(1)
        return mu + m.unsqueeze(-1)


@register_estimator
class MeanKind(RowModelKind):
    """Registry entry of ``mean``."""

    name = "mean"
    help = "the fitted mean row, shifted to the exact row mean"
    tags = ("row-model", "baseline")
    row_class = MeanEstimator

    def cost(self, s: CostShape) -> dict[str, float]:
        """The fill (u), plus the mean of the observed residuals (b) when the offset is estimated."""
        return {"per_row": float(s.u + (0 if s.offset_known else s.b)), "setup": 0.0}
