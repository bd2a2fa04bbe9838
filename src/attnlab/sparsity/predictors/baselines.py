"""Baseline sparsity predictors: local window, BigBird-style, Reformer LSH, routing k-means, oracle top-k."""

from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import Tensor

from ...errors import ConfigError
from ..graphs import attention_scores, check_qk, full_valid
from .base import BasePredictor, int_grid, select_cost, topk_graph
from .clustering import KMeansPredictor


def band(nq: int, nk: int, window: int, device=None) -> Tensor:
    """Boolean (nq, nk) band |i - j| <= window."""
    i = torch.arange(nq, device=device)[:, None]
    j = torch.arange(nk, device=device)[None, :]
    return (i - j).abs() <= window


class WindowPredictor(BasePredictor):
    """Local window: edge iff |i - j| <= window (input independent, no cost). Knob: ``window``."""

    name = "window"
    knob = "window"

    def __init__(self, window: int = 8):
        super().__init__()
        self.window = window
        self._check()

    def _check(self) -> None:
        if int(self.window) < 0:
            raise ConfigError(f"--window must be >= 0 (got {self.window})")

    def _predict(self, q, k, valid):
        g = band(q.shape[2], k.shape[2], int(self.window), q.device)
        return g.expand(q.shape[0], q.shape[1], -1, -1).clone()

    def grid(self, n: int) -> list:
        return int_grid(n, [48, 32, 24, 16, 12, 8, 6, 4, 3, 2, 1, 0])


class BigBirdPredictor(BasePredictor):
    """BigBird-style (token level): window + ``n_global`` first tokens (both ways) + ``n_random`` random keys
    per query (seeded per head and query, the same for every sequence). Knob: ``window``."""

    name = "bigbird"
    knob = "window"

    def __init__(self, window: int = 4, n_global: int = 1, n_random: int = 2, seed: int = 0):
        super().__init__()
        self.window, self.n_global, self.n_random, self.seed = window, n_global, n_random, seed
        self._check()

    def _check(self) -> None:
        if int(self.window) < 0 or self.n_global < 0 or self.n_random < 0:
            raise ConfigError(f"--window, --n-global, --n-random must be >= 0 (got {self.window}, {self.n_global}, "
                              f"{self.n_random})")

    def _predict(self, q, k, valid):
        B, H, nq, _ = q.shape
        nk = k.shape[2]
        g = band(nq, nk, int(self.window), q.device).expand(B, H, -1, -1).clone()
        g[..., : self.n_global, :] = True
        g[..., :, : self.n_global] = True
        if self.n_random:  # one seeded draw per (head, query), the same for every window (batch- and shard-invariant)
            gen = torch.Generator().manual_seed(self.seed)
            r = torch.randint(nk, (H, nq, self.n_random), generator=gen).to(q.device)
            g.scatter_(-1, r.expand(B, -1, -1, -1), True)
        return g

    def grid(self, n: int) -> list:
        return int_grid(n, [32, 24, 16, 12, 8, 6, 4, 3, 2, 1, 0])

    def cost(self, n: int, pairs=None) -> float:
        return 0.0


class LSHPredictor(BasePredictor):
    """Reformer-style angular LSH: h(x) = argmax([xR, -xR]) of unit-normalised q and k with a shared random
    rotation R (d_head x n_buckets/2) per head and round; edge iff q and k share a bucket in any of ``n_hashes``
    rounds. Knob: ``n_buckets`` (1 = all pairs)."""

    name = "lsh"
    knob = "n_buckets"

    def __init__(self, n_buckets: int = 8, n_hashes: int = 1, seed: int = 0):
        super().__init__()
        self.n_buckets, self.n_hashes, self.seed = n_buckets, n_hashes, seed
        self._check()

    def _check(self) -> None:
        nb = int(self.n_buckets)
        if nb < 1 or (nb > 1 and nb % 2) or self.n_hashes < 1:
            raise ConfigError(f"--n-buckets must be 1 or even, --n-hashes >= 1 (got {self.n_buckets}, {self.n_hashes})")

    def rotations(self, H: int, dh: int) -> Tensor:
        """Random rotations (n_hashes, H, dh, n_buckets/2), deterministic in the seed."""
        g = torch.Generator().manual_seed(self.seed)
        return torch.randn(self.n_hashes, H, dh, max(int(self.n_buckets) // 2, 1), generator=g)

    def assign(self, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        """Bucket ids (B, H, N, n_hashes); round t uses ids [t*nb, (t+1)*nb)."""
        check_qk(q, k)
        nb = int(self.n_buckets)
        B, H, N, dh = q.shape
        R = self.rotations(H, dh).to(q.device)
        out = []
        for x in (q, k):
            if nb == 1:
                out.append(torch.arange(self.n_hashes, device=q.device).expand(B, H, x.shape[2], -1).clone())
                continue
            xn = F.normalize(x.float(), dim=-1)
            ids = []
            for t in range(self.n_hashes):
                proj = xn @ R[t]  # (B, H, N, nb/2)
                ids.append(torch.cat([proj, -proj], dim=-1).argmax(-1) + t * nb)
            out.append(torch.stack(ids, dim=-1))
        return out[0], out[1]

    def grid(self, n: int) -> list:
        return [b for b in [1, 2, 4, 6, 8, 12, 16, 24, 32, 48, 64] if b <= n]

    def cost(self, n: int, pairs=None) -> float:
        """Rotating 2n vectors per round: 2 n (n_buckets/2) n_hashes units."""
        return float(n * max(int(self.n_buckets), 1) * self.n_hashes) if int(self.n_buckets) > 1 else 0.0


class RoutingPredictor(KMeansPredictor):
    """Routing-Transformer-style: k-means on raw unit-normalised q and k (pooled, per head, fitted on fit data),
    top-1 centroid each; edge iff same cluster. Knob: ``n_clusters``."""

    name = "routing"

    def __init__(self, n_clusters: int = 4, iters: int = 15, max_points: int = 4096, seed: int = 0):
        super().__init__(n_clusters, 1, iters, max_points, seed)
        self._check()

    def _embed(self, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        return F.normalize(q.float(), dim=-1), F.normalize(k.float(), dim=-1)

    def fit(self, q, k, gold, valid=None, shard=None):
        """Keep a sample of normalised q and k per head for k-means (fitted lazily per n_clusters)."""
        super().fit(q, k, gold, valid)
        self._keep_points(q, k, shard)
        return self

    def cost(self, n: int, pairs=None) -> float:
        """Distances of 2n vectors to C centroids in d_head dims: 2 n C units."""
        return 2.0 * n * int(self.n_clusters) if int(self.n_clusters) > 1 else 0.0


class OracleTopK(BasePredictor):
    """Oracle: the k highest true scores per query (needs all valid scores, so its cost is >= 1). Knob: ``k``."""

    name = "oracle-topk"
    knob = "k"

    def __init__(self, k: int = 16):
        super().__init__()
        self.k = k
        self._check()

    def _check(self) -> None:
        if int(self.k) < 0:
            raise ConfigError(f"--k must be >= 0 (got {self.k})")

    def _predict(self, q, k, valid):
        s = attention_scores(q, k)
        return topk_graph(s, int(self.k), None if valid is None else full_valid(valid, tuple(s.shape), s.device))

    def grid(self, n: int) -> list:
        return int_grid(n, [64, 48, 32, 24, 16, 12, 8, 6, 4, 3, 2, 1])

    def cost(self, n: int, pairs=None) -> float:
        """All candidate scores, plus top-k selection."""
        pairs = float(n * n) if pairs is None else float(pairs)
        return pairs + select_cost(pairs, self.k, self.d_head or 64)

    def compute_ops(self, q, k, valid=None):
        """Every score is computed."""
        return torch.full((q.shape[0], q.shape[1]), float(q.shape[2] * k.shape[2]), dtype=torch.float64)
