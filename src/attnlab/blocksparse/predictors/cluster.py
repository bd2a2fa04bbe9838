"""The cluster block predictors: q and k clustered with shared centroids, tokens sorted by cluster.

* :class:`ClusterBlockPredictor` -- Routing-Transformer / Reformer style: spherical k-means (or random
  hyperplane LSH) on q and k with shared centroids; tokens are sorted by cluster id so that same-cluster pairs
  become dense diagonal tiles, the output is scattered back with the inverse permutation. Optionally an
  ``inner`` pooled predictor adds top tiles scored in the sorted order. ``assign(q, k)`` gives the bucket ids
  ((B, H, N, n_hash) int), the interface token-level bucket predictors share.
* :class:`ClusterBlocks` -- registered as ``cluster``: same-cluster tiles kept, plus pooled-estimate tiles in
  the sorted order up to the knob ``tau`` (a permuted pattern). Cost: 2 N * D * C for the assignment plus
  the pooled scores (N/pool)^2 * D per head.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from attnlab.errors import ConfigError
from attnlab.blocksparse import contracts
from attnlab.blocksparse.blockmask import (BlockPattern, cluster_block_graph, cluster_pattern, cluster_permutation,
                                           permute_tokens)
from attnlab.blocksparse.recall import sample_rows

from .core import ScoredBlockMethod, mass_thresholds
from .pooled import PooledBudgetPredictor, check_call, check_qk, pooled_lse
from .registry import BLOCK_PREDICTORS

__all__ = ["ClusterBlockPredictor", "ClusterBlocks", "pattern_from_ids"]


@dataclass
class ClusterBlockPredictor:
    """Cluster q and k with shared centroids, sort tokens by cluster, keep same-cluster tiles (+ optional
    ``inner`` top tiles scored in the sorted order). method: 'kmeans' (spherical, ``iters`` Lloyd steps on
    ``fit_rows`` sampled q and k rows per head) | 'lsh' (sign of ``ceil(log2 n_clusters)`` random
    hyperplanes). Centroids are fitted on the fly unless :meth:`fit` was called."""

    n_clusters: int = 16
    method: str = "kmeans"
    iters: int = 5
    fit_rows: int = 4096
    inner: PooledBudgetPredictor | None = None
    seed: int = 0
    centroids: Tensor | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.method not in ("kmeans", "lsh"):
            raise ConfigError(f"method must be 'kmeans' or 'lsh', got {self.method!r}")
        contracts.check_int(self.n_clusters, "n_clusters")
        contracts.check_int(self.iters, "iters", lo=0)
        contracts.check_int(self.fit_rows, "fit_rows", lo=2)

    def fit(self, q: Tensor, k: Tensor) -> "ClusterBlockPredictor":
        """Fit centroids (H, C, D) (kmeans) or hyperplanes (H, D, bits) (lsh) from q, k."""
        check_qk(q, k)
        B, H, N, D = q.shape
        g = torch.Generator().manual_seed(self.seed)
        if self.method == "lsh":
            bits = max(1, math.ceil(math.log2(self.n_clusters)))
            self.centroids = torch.randn(H, D, bits, generator=g).to(q.device)
            return self
        idx = sample_rows(N, self.fit_rows // 2, self.seed, None, q.device)
        x = torch.cat([q[:, :, idx], k[:, :, idx]], dim=2).float().transpose(0, 1).reshape(H, -1, D)
        x = torch.nn.functional.normalize(x, dim=-1)
        init = torch.randperm(x.shape[1], generator=g)[: self.n_clusters].to(q.device)
        c = x[:, init]  # (H, C, D)
        for _ in range(self.iters):
            a = torch.matmul(x, c.transpose(-1, -2)).argmax(-1)  # (H, R)
            s = torch.zeros_like(c).scatter_add_(1, a.unsqueeze(-1).expand(-1, -1, D), x)
            empty = s.norm(dim=-1, keepdim=True) < 1e-12
            c = torch.where(empty, c, torch.nn.functional.normalize(s, dim=-1))
        self.centroids = c
        return self

    def _ids(self, x: Tensor) -> Tensor:
        c = self.centroids.to(device=x.device, dtype=x.dtype)
        if self.method == "lsh":
            bits = (torch.matmul(x, c.unsqueeze(0)) > 0).long()
            w = 2 ** torch.arange(bits.shape[-1], device=x.device)
            return (bits * w).sum(-1)
        return torch.matmul(x, c.unsqueeze(0).transpose(-1, -2)).argmax(-1)

    def assign(self, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        """Bucket-id interface (as token-level bucket predictors): q, k (B, H, N, D) -> (q_ids, k_ids) (B, H, N, 1) int64. Without a prior
        :meth:`fit` (or with other heads/dims) the centroids are fitted on these inputs and not kept."""
        c = self.centroids
        if c is None or c.shape[0] != q.shape[1] or c.shape[-2 if self.method == "lsh" else -1] != q.shape[-1]:
            self.fit(q, k)
            try:
                return self._ids(q).unsqueeze(-1), self._ids(k).unsqueeze(-1)
            finally:
                self.centroids = c
        return self._ids(q).unsqueeze(-1), self._ids(k).unsqueeze(-1)

    def predict_blocks(self, q: Tensor, k: Tensor, block_size: int = 128, causal: bool = False,
                       scale: float | None = None) -> BlockPattern:
        """q, k -> permuted :class:`BlockPattern`."""
        check_call(q, k, block_size, scale)
        q_ids, k_ids = self.assign(q, k)
        return pattern_from_ids(q, k, q_ids[..., 0], k_ids[..., 0], block_size, causal, self.inner, scale)

    def cost(self, n: int, d: int, block_size: int = 128) -> float:
        """Multiply-adds per head (assignment + optional inner scoring; the fit is extra)."""
        c = n * d * self.n_clusters * 2
        return c + (self.inner.cost(n, d, block_size) if self.inner is not None else 0.0)


def pattern_from_ids(q: Tensor, k: Tensor, q_ids: Tensor, k_ids: Tensor, block_size: int, causal: bool,
                     inner: PooledBudgetPredictor | None, scale: float | None) -> BlockPattern:
    """Permuted pattern of same-cluster tiles from per-token ids (B, H, N), plus ``inner``'s tiles scored in
    the sorted order."""
    extra = None
    if inner is not None:
        qp, _ = cluster_permutation(q_ids)
        kp, _ = cluster_permutation(k_ids)
        # causal filtering happens in cluster_pattern (positions); score non-causally in sorted order
        inner_pat = inner.predict_blocks(permute_tokens(q, qp), permute_tokens(k, kp), block_size, False, scale)
        extra = inner_pat.block_graph()
    return cluster_pattern(q_ids, k_ids, block_size, causal, extra)


@BLOCK_PREDICTORS.register("cluster", help="ours: k-means sort + same-cluster tiles + pooled tiles up to tau",
                           tags=("ours",))
@dataclass
class ClusterBlocks(ScoredBlockMethod):
    """Cluster-sorted pattern; knob = tau of the pooled tiles added in the sorted order."""

    n_clusters: int = 16
    iters: int = 4
    pool: int = 32

    def prepare(self, q: Tensor, k: Tensor, causal: bool, block_size: int, scale: float) -> tuple[Any, float]:
        """Cluster ids, sort, pooled tile mass in the sorted order."""
        B, H, N, D = q.shape
        cl = ClusterBlockPredictor(n_clusters=self.n_clusters, iters=self.iters, seed=self.seed)
        q_ids, k_ids = cl.assign(q, k)
        q_ids, k_ids = q_ids[..., 0], k_ids[..., 0]
        qp = torch.argsort(q_ids, dim=-1, stable=True)
        kp = torch.argsort(k_ids, dim=-1, stable=True)
        lse = pooled_lse(permute_tokens(q, qp), permute_tokens(k, kp), self.pool, block_size, False, scale)
        pool = min(self.pool, block_size)
        cost = float(B * H * (2 * N * D * self.n_clusters + (N / pool) * (k.shape[2] / pool) * D))
        return {"q_ids": q_ids, "k_ids": k_ids, "q_perm": qp, "k_perm": kp, "mass": torch.softmax(lse, dim=-1)}, cost

    def permutation(self, state: Any) -> tuple[Tensor, Tensor] | None:
        """Tiles live in the cluster-sorted order."""
        return state["q_perm"], state["k_perm"]

    def thresholds(self, state: Any, causal: bool, block_size: int) -> Tensor:
        """Same-cluster tiles and the diagonal always; pooled tiles by cumulative estimated mass."""
        th = mass_thresholds(state["mass"], False, 0)
        qs = torch.gather(state["q_ids"], -1, state["q_perm"])
        ks = torch.gather(state["k_ids"], -1, state["k_perm"])
        same = cluster_block_graph(qs, ks, block_size)
        th = th.masked_fill(same, float("-inf"))
        if causal:  # tiles whose keys all follow all their queries are never computed
            bs = block_size
            qhi = state["q_perm"].view(*qs.shape[:2], -1, bs).amax(-1)
            klo = state["k_perm"].view(*ks.shape[:2], -1, bs).amin(-1)
            th = th.masked_fill(qhi.unsqueeze(-1) < klo.unsqueeze(-2), float("inf"))
        return th

    def build(self, state: Any, graph: Tensor, causal: bool, block_size: int) -> BlockPattern:
        """Permuted pattern (causal tiles split into full and partial by positions)."""
        return cluster_pattern(state["q_ids"], state["k_ids"], block_size, causal, graph)
