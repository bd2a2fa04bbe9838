"""``none``: no estimate; unobserved keys get -inf (sparse attention on the selected pairs), and its cost."""

from __future__ import annotations

import torch

from ..cost_shape import CostShape
from .base import register_estimator
from .row import Estimator, RowModelKind


class NoneEstimator(Estimator):
    """Unselected keys masked out: the softmax runs over the selected pairs only."""

    def _estimate(self, r, full, mu, obs_valid, shared, known) -> torch.Tensor:
        return torch.full(mu.shape, float("-inf"), dtype=mu.dtype, device=mu.device)


@register_estimator
class NoneKind(RowModelKind):
    """Registry entry of ``none``."""

    name = "none"
    help = "unselected keys masked out (attention over the selected pairs only)"
    tags = ("row-model", "sparse", "baseline")
    row_class = NoneEstimator

    def cost(self, s: CostShape) -> dict[str, float]:
        """Sparse attention on the selected pairs: no estimate."""
        return {"per_row": 0.0, "setup": 0.0}
