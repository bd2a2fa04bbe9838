"""Sparsefinder's clustering predictor: k-means in the learned projected space; attend within clusters.

Per (layer, head), k-means runs on the projected queries and keys of the fit data pooled together.
Each query / key goes to its ``top`` (1 or 2) nearest centroids; edge iff they share a centroid.
Knob: ``n_clusters`` (1 = all pairs). Centroids are fitted lazily per knob value and cached.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ...distributed import WindowShard
from ...errors import ConfigError
from .base import BasePredictor
from .dataparallel import POINTS, pooled_sample, shard_of
from .distance import Projector


def kmeans(x: Tensor, n_clusters: int, iters: int = 25, seed: int = 0) -> Tensor:
    """Batched k-means (k-means++ init, Lloyd iterations) on x (H, M, d); returns centroids (H, C, d)."""
    H, M, d = x.shape
    if n_clusters < 1:
        raise ConfigError(f"--n-clusters must be >= 1 (got {n_clusters})")
    g = torch.Generator().manual_seed(seed)
    x = x.float().cpu()
    C = min(n_clusters, M)
    cent = torch.empty(H, C, d)
    first = torch.randint(M, (H,), generator=g)
    cent[:, 0] = x[torch.arange(H), first]
    dmin = (x - cent[:, :1]).pow(2).sum(-1)
    for c in range(1, C):
        w = dmin.clamp(min=0) + 1e-12
        pick = torch.multinomial(w, 1, generator=g).squeeze(1)
        cent[:, c] = x[torch.arange(H), pick]
        dmin = torch.minimum(dmin, (x - cent[:, c:c + 1]).pow(2).sum(-1))
    for _ in range(iters):
        assign = torch.cdist(x, cent).argmin(-1)  # (H, M)
        onehot = torch.nn.functional.one_hot(assign, C).float()  # (H, M, C)
        counts = onehot.sum(1)  # (H, C)
        sums = onehot.transpose(1, 2) @ x  # (H, C, d)
        new = torch.where(counts[..., None] > 0, sums / counts.clamp(min=1)[..., None], cent)
        if torch.allclose(new, cent):
            break
        cent = new
    if C < n_clusters:  # fewer points than clusters: pad with far-away unused centroids
        cent = torch.cat([cent, torch.full((H, n_clusters - C, d), 1e9)], dim=1)
    return cent


def nearest_centroids(x: Tensor, cent: Tensor, top: int) -> Tensor:
    """Ids (B, H, N, top) of the ``top`` nearest centroids (H, C, d) of x (B, H, N, d)."""
    d = torch.cdist(x, cent.to(x.device).unsqueeze(0).expand(x.shape[0], -1, -1, -1))
    return d.topk(min(top, cent.shape[1]), dim=-1, largest=False).indices


class KMeansPredictor(BasePredictor):
    """Shared machinery of the k-means predictors: per-head k-means on a sample of embedded queries and keys
    of the fit data, centroids fitted lazily per ``n_clusters`` and cached; each vector goes to its ``top``
    nearest centroids and an edge exists iff a query and a key share one. Subclasses define ``_embed``."""

    knob = "n_clusters"

    def __init__(self, n_clusters: int, top: int, iters: int, max_points: int, seed: int):
        super().__init__()
        self.n_clusters, self.top, self.iters, self.max_points, self.seed = n_clusters, top, iters, max_points, seed
        self._points: Optional[Tensor] = None  # (H, M, d) sample of embedded q and k
        self._centroids: dict[int, Tensor] = {}

    def _embed(self, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        """The space k-means runs in: (B, H, N, d) queries and keys."""
        raise NotImplementedError

    def _check(self) -> None:
        if int(self.n_clusters) < 1:
            raise ConfigError(f"--n-clusters must be >= 1 (got {self.n_clusters})")
        if self.top not in (1, 2):
            raise ConfigError(f"--top must be 1 or 2 (got {self.top})")

    def _keep_points(self, q: Tensor, k: Tensor, shard: Optional[WindowShard] = None) -> None:
        """Keep at most ``max_points`` embedded fit vectors per head (drawn evenly from every window of the shard,
        seeded per window, gathered in window order) and reset the centroids."""
        shard = shard_of(shard, q.shape[0])
        with torch.no_grad():
            eq, ek = self._embed(q.cpu(), k.cpu())
            per_window = list(torch.cat([eq, ek], dim=2))  # (H, 2N, d) each
            pts = pooled_sample(shard, per_window, self.max_points, self.seed, POINTS, dim=1)  # (H, M, d)
        self._points, self._centroids = pts, {}

    def centroids(self) -> Tensor:
        """Centroids (H, C, d) for the current ``n_clusters`` (computed once, cached)."""
        self._require_fit()
        c = int(self.n_clusters)
        if c not in self._centroids:
            self._centroids[c] = kmeans(self._points, c, self.iters, self.seed)
        return self._centroids[c]

    def assign(self, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        """Cluster ids (B, H, N, top) of queries and keys."""
        eq, ek = self._embed(q, k)
        cent = self.centroids()
        return nearest_centroids(eq, cent, self.top), nearest_centroids(ek, cent, self.top)

    def _predict(self, q, k, valid):
        if int(self.n_clusters) == 1:
            return torch.ones(q.shape[0], q.shape[1], q.shape[2], k.shape[2], dtype=torch.bool, device=q.device)
        return super()._predict(q, k, valid)

    def grid(self, n: int) -> list:
        return [c for c in [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64] if c <= n]


class ClusteringPredictor(KMeansPredictor):
    """k-means clusters of learned projections; ``assign`` gives (B, H, N, top) cluster ids."""

    name = "clustering"

    def __init__(self, n_clusters: int = 4, top: int = 1, rank: int = 4, shared: bool = False, epochs: int = 20,
                 lr: float = 1e-2, margin: float = 1.0, seed: int = 0, iters: int = 15, max_points: int = 4096,
                 projector: Optional[Projector] = None):
        super().__init__(n_clusters, top, iters, max_points, seed)
        self.projector = projector or Projector(rank, shared, epochs, lr, margin, seed=seed)
        self.name = "clustering" if top == 1 else f"clustering-top{top}"
        self._check()

    def _embed(self, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        return self.projector.project(q, k)

    def fit(self, q, k, gold, valid=None, shard: Optional[WindowShard] = None):
        """Train the projections (unless shared and fitted) and keep a sample of projected points for k-means."""
        super().fit(q, k, gold, valid)
        if self.projector.wq is None:
            self.projector.fit(q, k, gold, valid, shard=shard)
        self._keep_points(q, k, shard)
        return self

    def cost(self, n: int, pairs=None) -> float:
        """Projection (2 n r units) + distances of 2n points to C centroids in r dims (2 n C r / d_head)."""
        dh = self.d_head or 64
        r = self.projector.rank
        return 2.0 * n * r + 2.0 * n * int(self.n_clusters) * r / dh
