"""Sparsefinder's quantization predictor: bucket each learned projected coordinate; attend within buckets.

``mode="fixed"`` (default): per sequence, head and projected coordinate, queries and keys are each sorted
and cut into ``n_buckets`` equal-size buckets by rank (bucket size b = N / n_buckets), as the public code's
fixed-size buckets. ``mode="dynamic"``: the tanh of the coordinate is cut into ``n_buckets`` equal-width
bins of [-1, 1]. Edge (i, j) iff query i and key j share a bucket in *any* coordinate.
Knob: ``n_buckets`` (1 = all pairs; more buckets = sparser).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from ...errors import ConfigError
from .base import BasePredictor
from .distance import Projector


class QuantizationPredictor(BasePredictor):
    """Bucketing of learned projections; ``assign`` gives (B, H, N, r) bucket ids (disjoint per coordinate)."""

    name = "quantization"
    knob = "n_buckets"

    def __init__(self, n_buckets: int = 4, mode: str = "fixed", rank: int = 4, shared: bool = False, epochs: int = 20,
                 lr: float = 1e-2, margin: float = 1.0, seed: int = 0, projector: Optional[Projector] = None):
        super().__init__()
        self.n_buckets, self.mode = n_buckets, mode
        self.projector = projector or Projector(rank, shared, epochs, lr, margin, seed=seed)
        self._check()

    def _check(self) -> None:
        if self.mode not in ("fixed", "dynamic"):
            raise ConfigError(f"--mode must be fixed or dynamic (got {self.mode!r})")
        if int(self.n_buckets) < 1:
            raise ConfigError(f"--n-buckets must be >= 1 (got {self.n_buckets})")

    def fit(self, q, k, gold, valid=None):
        """Train the projections (unless the shared projector is already fitted)."""
        super().fit(q, k, gold, valid)
        if self.projector.wq is None:
            self.projector.fit(q, k, gold, valid)
        return self

    def _bucket(self, x: Tensor) -> Tensor:
        nb = int(self.n_buckets)
        if self.mode == "dynamic":
            return ((torch.tanh(x) + 1.0) * 0.5 * nb).long().clamp(0, nb - 1)
        n = x.shape[2]
        rank = x.argsort(dim=2).argsort(dim=2)  # rank along the sequence, per coordinate
        return (rank * nb) // n

    def assign(self, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        """Bucket ids (B, H, N, r) for queries and keys; coordinate c uses ids [c*nb, (c+1)*nb)."""
        self._require_fit()
        pq, pk = self.projector.project(q, k)
        offset = torch.arange(pq.shape[-1], device=pq.device) * int(self.n_buckets)
        return self._bucket(pq) + offset, self._bucket(pk) + offset

    def _predict(self, q, k, valid):
        if int(self.n_buckets) == 1:
            return torch.ones(q.shape[0], q.shape[1], q.shape[2], k.shape[2], dtype=torch.bool, device=q.device)
        return super()._predict(q, k, valid)

    def grid(self, n: int) -> list:
        return [b for b in [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64] if b <= n]

    def cost(self, n: int) -> float:
        """Projection (2 n r units) + sorting 2 r sequences of n values (2 r n log2 n comparisons / d_head)."""
        dh = self.d_head or 64
        r = self.projector.rank
        return 2.0 * n * r + 2.0 * r * n * math.log2(max(n, 2)) / dh
