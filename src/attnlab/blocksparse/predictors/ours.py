"""Our block predictors in the common interface: ``pooled`` and ``cluster``.

``pooled``: mean-pooled q and k over sub-blocks of ``pool`` tokens, the log-sum-exp of each tile's pooled
scores estimates its log mass (:class:`~attnlab.blocksparse.block_predictors.PooledBlockPredictor`); softmax
over a query block's tiles gives the estimated mass; tiles are kept per query block, largest first, until
the estimate reaches the knob ``tau`` (diagonal and first key block always kept).
``cluster``: spherical k-means on q and k with shared centroids; tokens sorted by cluster, same-cluster tiles
kept, plus pooled-estimate tiles in the sorted order up to ``tau`` (a permuted pattern).
Cost: pooled (N/pool)^2 * D per head; cluster adds 2 N * D * C for the assignment.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from attnlab.blocksparse.block_predictors import ClusterBlockPredictor, PooledBlockPredictor
from attnlab.blocksparse.blockmask import BlockPattern, cluster_block_graph, cluster_pattern, permute_tokens

from . import BLOCK_PREDICTORS
from .core import ScoredBlockMethod, mass_thresholds


@BLOCK_PREDICTORS.register("pooled", help="ours: pooled q.k log-sum-exp tile mass, cumulative threshold",
                           tags=("ours",))
@dataclass
class PooledBlocks(ScoredBlockMethod):
    """Pooled tile-mass estimate; knob = cumulative threshold tau per head."""

    pool: int = 32

    def prepare(self, q: Tensor, k: Tensor, causal: bool, block_size: int, scale: float) -> tuple[Any, float]:
        """Estimated tile mass: softmax over each query block's lse tile scores."""
        B, H, N, D = q.shape
        pred = PooledBlockPredictor(pool=self.pool)
        lse = pred.tile_scores(q, k, block_size, causal, scale, ("lse",))["lse"]
        pool = min(self.pool, block_size)
        return torch.softmax(lse, dim=-1), float(B * H * (N / pool) * (k.shape[2] / pool) * D) * (
            0.5 if causal else 1.0)

    def thresholds(self, state: Any, causal: bool, block_size: int) -> Tensor:
        """Tiles until the estimated mass reaches tau."""
        return mass_thresholds(state, causal, sink_blocks=1)


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
        pred = PooledBlockPredictor(pool=self.pool)
        lse = pred.tile_scores(permute_tokens(q, qp), permute_tokens(k, kp), block_size, False, scale, ("lse",))["lse"]
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
