"""Sparsefinder's quantization predictor: bucket each learned projected coordinate; attend within buckets.

Edge (i, j) iff query i and key j share a bucket in *any* projected coordinate. Bucketing modes:

* ``"fixed"``: per sequence, head and coordinate, queries and keys are *each* sorted and cut into
  ``n_buckets`` equal-size buckets by rank (the public code's ``--same-size`` buckets).
* ``"dynamic"``: tanh(temperature * x) cut into ``n_buckets`` equal-width bins of [-1, 1] (the public code's
  default, ``--temp 1``).
* ``"shared"`` (default, attnlab's fix): per head and coordinate, boundaries at the 1/n_buckets quantiles of
  the *keys'* projections pooled over the fit data, applied to queries and keys alike.

Why "fixed" is near chance on trained models: ranks are taken separately for queries and keys, so bucket b of
the queries and bucket b of the keys hold the b-th quantiles of two different distributions. A gold pair is
close in projected space, but when many queries attend to a few keys (attention sinks such as [CLS], [SEP],
punctuation) those keys sit in one key bucket while their queries are spread over all query buckets, so most
gold pairs land in different buckets; recall then falls to about the predicted density. "dynamic" shares
boundaries but its fixed [-1, 1] grid saturates (most projected values have |x| >> 1). "shared" keeps shared
boundaries and puts them where the keys are. Knob: ``n_buckets`` (1 = all pairs; more buckets = sparser).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from ...distributed import WindowShard
from ...errors import ConfigError
from .base import BasePredictor
from .dataparallel import KEYS, pooled_sample, shard_of
from .distance import Projector


class QuantizationPredictor(BasePredictor):
    """Bucketing of learned projections; ``assign`` gives (B, H, N, r) bucket ids (disjoint per coordinate)."""

    name = "quantization"
    knob = "n_buckets"

    def __init__(self, n_buckets: int = 4, mode: str = "shared", rank: int = 4, shared: bool = False, epochs: int = 20,
                 lr: float = 1e-2, margin: float = 1.0, seed: int = 0, projector: Optional[Projector] = None,
                 temperature: float = 1.0, max_points: int = 100_000):
        super().__init__()
        self.n_buckets, self.mode, self.temperature, self.max_points = n_buckets, mode, temperature, max_points
        self.projector = projector or Projector(rank, shared, epochs, lr, margin, seed=seed)
        self._keys: Optional[Tensor] = None  # (H, r, M) sorted fit-key projections per coordinate ("shared")
        self._check()

    def _check(self) -> None:
        if self.mode not in ("fixed", "dynamic", "shared"):
            raise ConfigError(f"--quant-mode must be fixed, dynamic or shared (got {self.mode!r})")
        if int(self.n_buckets) < 1:
            raise ConfigError(f"--n-buckets must be >= 1 (got {self.n_buckets})")

    def fit(self, q, k, gold, valid=None, shard: Optional[WindowShard] = None):
        """Train the projections (unless the shared projector is already fitted) and keep a sorted sample of the
        fit keys' projections (at most ``max_points`` per head and coordinate, drawn evenly from every window)."""
        super().fit(q, k, gold, valid)
        shard = shard_of(shard, q.shape[0])
        if self.projector.wq is None:
            self.projector.fit(q, k, gold, valid, shard=shard)
        with torch.no_grad():
            _, pk = self.projector.project(q.cpu(), k.cpu())  # (B, H, N, r)
            per_window = [x.transpose(1, 2) for x in pk]  # (H, r, N) each
            self._keys = pooled_sample(shard, per_window, self.max_points, self.projector.seed, KEYS).sort(dim=-1).values
        return self

    def boundaries(self) -> Tensor:
        """Inner bucket boundaries (H, r, n_buckets - 1) of the "shared" mode: key quantiles of the fit data."""
        self._require_fit()
        nb = int(self.n_buckets)
        m = self._keys.shape[-1]
        idx = (torch.arange(1, nb) * m) // nb
        return self._keys[..., idx.clamp(max=m - 1)]

    def _bucket(self, x: Tensor) -> Tensor:
        nb = int(self.n_buckets)
        if self.mode == "dynamic":
            return ((torch.tanh(self.temperature * x) + 1.0) * 0.5 * nb).long().clamp(0, nb - 1)
        if self.mode == "shared":
            b = self.boundaries().to(x.device)  # (H, r, nb-1)
            return (x.unsqueeze(-1) > b.unsqueeze(0).unsqueeze(2)).sum(-1)  # (B, H, N, r)
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

    def cost(self, n: int, pairs=None) -> float:
        """Projection (2 n r units) + bucketing 2 r n values: sorting (fixed: 2 r n log2 n comparisons / d_head) or a
        binary search over the boundaries (shared / dynamic: 2 r n log2 n_buckets / d_head)."""
        dh = self.d_head or 64
        r = self.projector.rank
        depth = math.log2(max(n, 2)) if self.mode == "fixed" else math.log2(max(int(self.n_buckets), 2))
        return 2.0 * n * r + 2.0 * r * n * depth / dh
