"""Sparsefinder's learned low-dimensional projections and the distance-based predictor.

Per head, a linear map d_head -> r (default r = 4) for queries and one for keys (or one shared) is trained
with the margin loss of Treviso et al. per query i:

    relu(margin + sum_{j in P_i} ||q_i - k_j||^2 - sum_{j in N_i} ||q_i - k_j||^2)

where P_i are gold keys of query i and N_i as many keys sampled from its non-gold valid keys (when a
query has fewer non-gold than gold keys, both sides are subsampled to the smaller count). Adam, per
layer. Inputs are standardised per head first (one scale for q and k). The predicted graph keeps pairs
whose projected distance is below a threshold (``mode="threshold"``; knob = the per-head quantile of
fitted pair distances, so ``quantile`` ~ predicted density) or each query's k nearest keys (``mode="knn"``).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor

from ...distributed import WindowShard, window_generator
from ...errors import ConfigError
from ..graphs import check_qk, full_valid
from .base import BasePredictor, int_grid, select_cost, topk_graph
from .dataparallel import CALIB, PAIRS, fit_minibatches, head_std, pooled_sample, shard_of


class Projector:
    """Per-head learned projections of queries and keys to r dimensions (the Sparsefinder encoder).

    ``loss="sum"`` is Sparsefinder's per-query loss (sums of squared distances); ``loss="pair"`` (an attnlab
    option) is a hinge per (positive, negative) pair, relu(margin + d(q, k+) - d(q, k-)), which asks every
    sampled gold key to be closer than a sampled non-gold one rather than only on aggregate."""

    def __init__(self, rank: int = 4, shared: bool = False, epochs: int = 20, lr: float = 1e-2, margin: float = 1.0,
                 batch_size: int = 16, seed: int = 0, loss: str = "sum"):
        if loss not in ("sum", "pair"):
            raise ConfigError(f"--loss must be sum (Sparsefinder's per-query sums) or pair (per-pair hinge), got {loss!r}")
        self.loss = loss
        if rank < 1:
            raise ConfigError(f"--rank must be >= 1 (got {rank})")
        if epochs < 0 or lr <= 0 or batch_size < 1:
            raise ConfigError(f"--epochs >= 0, --lr > 0, --batch-size >= 1 required (got {epochs}, {lr}, {batch_size})")
        self.rank, self.shared, self.epochs, self.lr, self.margin = rank, shared, epochs, lr, margin
        self.batch_size, self.seed = batch_size, seed
        self.wq: Optional[Tensor] = None  # (H, dh, r)
        self.wk: Optional[Tensor] = None
        self.bq: Optional[Tensor] = None  # (H, 1, r)
        self.bk: Optional[Tensor] = None
        self.scale: Optional[Tensor] = None  # (H, 1, 1) input standardisation
        self.history: list[float] = []

    def project(self, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        """Projected (B, H, N, r) queries and keys (float32)."""
        if self.wq is None:
            raise ConfigError("projector is not fitted: call fit(q, k, gold, valid) first")
        dev = q.device
        qs, ks = q.float() / self.scale.to(dev), k.float() / self.scale.to(dev)
        return qs @ self.wq.to(dev) + self.bq.to(dev), ks @ self.wk.to(dev) + self.bk.to(dev)

    def state(self) -> dict[str, Tensor]:
        """Learned tensors (for safetensors)."""
        return {"wq": self.wq, "wk": self.wk, "bq": self.bq, "bk": self.bk, "scale": self.scale}

    def fit(self, q: Tensor, k: Tensor, gold: Tensor, valid: Optional[Tensor] = None,
            shard: Optional[WindowShard] = None) -> "Projector":
        """Train the projections on one layer's q, k (B, H, N, dh) and gold graph with the margin loss.

        ``shard``: the windows are this rank's share of a torchrun run; training is data-parallel over every rank's
        windows (see :mod:`.dataparallel`) and every rank ends with the same projections. Training runs in float64;
        the learned tensors are stored as float32."""
        check_qk(q, k)
        B, H, N, dh = q.shape
        shard = shard_of(shard, B)
        g = torch.Generator().manual_seed(self.seed)
        q, k = q.detach().float().cpu(), k.detach().float().cpu()
        gold = gold.bool().cpu()
        v = full_valid(None if valid is None else valid.cpu(), tuple(gold.shape))
        scale = head_std(shard, torch.cat([q, k], dim=2)).clamp(min=1e-6).view(H, 1, 1)
        init = lambda: (torch.randn(H, dh, self.rank, generator=g) / math.sqrt(dh)).double()  # noqa: E731
        wq = init().requires_grad_()
        wk = wq if self.shared else init().requires_grad_()
        bq = torch.zeros(H, 1, self.rank, dtype=torch.float64, requires_grad=True)
        bk = bq if self.shared else torch.zeros(H, 1, self.rank, dtype=torch.float64, requires_grad=True)
        params = [wq, bq] if self.shared else [wq, wk, bq, bk]
        opt = torch.optim.Adam(params, lr=self.lr)
        qs, ks = q.double() / scale, k.double() / scale

        def batch_loss(idx: list[int], glob: list[int], epoch: int):
            pq, pk = qs[idx] @ wq + bq, ks[idx] @ wk + bk
            d = torch.cdist(pq, pk).pow(2)  # (b, H, N, N)
            pos, neg = sample_pairs(gold[idx], v[idx], [window_generator(self.seed, PAIRS, epoch, w) for w in glob])
            used = pos.any(-1)
            if not bool(used.any()):
                return None, 0
            if self.loss == "sum":
                row = torch.relu(self.margin + (d * pos).sum(-1) - (d * neg).sum(-1))
                return row[used].sum(), int(used.sum())
            # pair the i-th sampled positive with the i-th sampled negative (index order)
            m = int(pos.sum(-1).max())
            ip, ineg = pos.argsort(dim=-1, descending=True, stable=True)[..., :m], \
                neg.argsort(dim=-1, descending=True, stable=True)[..., :m]
            ok = torch.arange(m) < pos.sum(-1, keepdim=True)
            hinge = torch.relu(self.margin + d.gather(-1, ip) - d.gather(-1, ineg))
            return hinge[ok].sum(), int(ok.sum())

        self.history = fit_minibatches(params, opt, shard, self.epochs, self.batch_size, g, batch_loss)
        self.scale = scale.float()
        self.wq, self.bq = wq.detach().float(), bq.detach().float()
        self.wk, self.bk = wk.detach().float(), bk.detach().float()
        return self


def sample_pairs(gold: Tensor, valid: Tensor, g: torch.Generator | Sequence[torch.Generator]) -> tuple[Tensor, Tensor]:
    """Per query, m = min(#gold, #non-gold valid) random gold keys and m random non-gold valid keys (masks).

    ``g``: one generator, or one per window (batch row) so that a window's draw does not depend on its batch."""
    posm, negm = gold & valid, valid & ~gold
    m = torch.minimum(posm.sum(-1, keepdim=True), negm.sum(-1, keepdim=True))
    if isinstance(g, torch.Generator):
        u = torch.rand(gold.shape, generator=g)
    else:
        u = torch.stack([torch.rand(gold.shape[1:], generator=gi) for gi in g])

    def pick(mask: Tensor) -> Tensor:
        key = torch.where(mask, u, torch.full_like(u, 2.0))
        rank = key.argsort(dim=-1).argsort(dim=-1)
        return mask & (rank < m)

    return pick(posm).float(), pick(negm).float()


class DistancePredictor(BasePredictor):
    """Edge if the learned r-dimensional projections of q and k are close (threshold or k nearest keys)."""

    name = "distance"

    def __init__(self, mode: str = "threshold", quantile: float = 0.1, k: int = 16, rank: int = 4, shared: bool = False,
                 epochs: int = 20, lr: float = 1e-2, margin: float = 1.0, seed: int = 0,
                 projector: Optional[Projector] = None, calib_samples: int = 200_000):
        super().__init__()
        self.mode, self.quantile, self.k, self.calib_samples = mode, quantile, k, calib_samples
        self.knob = "quantile" if mode == "threshold" else "k"
        self.name = f"distance-{'thr' if mode == 'threshold' else 'knn'}"
        self.projector = projector or Projector(rank, shared, epochs, lr, margin, seed=seed)
        self._dists: Optional[Tensor] = None  # (H, S) sorted sample of fitted valid-pair distances
        self._thresholds: dict = {}  # (sample, quantile) -> per-head thresholds
        self._check()

    def _check(self) -> None:
        if self.mode not in ("threshold", "knn"):
            raise ConfigError(f"--mode must be threshold or knn (got {self.mode!r})")
        if self.mode == "threshold" and not 0.0 <= self.quantile <= 1.0:
            raise ConfigError(f"--quantile must be in [0, 1] (got {self.quantile})")
        if self.mode == "knn" and self.k < 0:
            raise ConfigError(f"--k must be >= 0 (got {self.k})")

    def fit(self, q, k, gold, valid=None, shard: Optional[WindowShard] = None):
        """Train the projections (unless the projector is already fitted) and calibrate thresholds on a sample of
        fitted valid-pair distances (at most ``calib_samples`` per head, drawn evenly from every window)."""
        super().fit(q, k, gold, valid)
        shard = shard_of(shard, q.shape[0])
        if self.projector.wq is None:
            self.projector.fit(q, k, gold, valid, shard=shard)
        with torch.no_grad():
            pq, pk = self.projector.project(q.cpu(), k.cpu())
            d = torch.cdist(pq, pk)  # (B, H, N, N)
            v = full_valid(None if valid is None else valid.cpu(), tuple(d.shape))
            # the valid mask is shared by heads: one (H, M_b) block of valid-pair distances per window
            per_window = [d[b][:, v[b, 0]] for b in range(d.shape[0])]
            pool = pooled_sample(shard, per_window, self.calib_samples, self.projector.seed, CALIB)
            self._dists = pool.sort(dim=1).values
            self._thresholds.clear()
        return self

    def thresholds(self) -> Tensor:
        """Per-head distance thresholds (H,) for the current quantile (inf at quantile 1)."""
        self._require_fit()
        if self.quantile >= 1.0:
            return torch.full((self._dists.shape[0],), float("inf"))
        key = (self._dists.data_ptr(), tuple(self._dists.shape), float(self.quantile))
        if key not in self._thresholds:  # shared by the with_knob copies: one quantile per knob in a sweep
            self._thresholds[key] = torch.quantile(self._dists, self.quantile, dim=1)
        return self._thresholds[key]

    def distances(self, q: Tensor, k: Tensor) -> Tensor:
        """Projected distances (B, H, Nq, Nk)."""
        pq, pk = self.projector.project(q, k)
        return torch.cdist(pq, pk)

    def _predict(self, q, k, valid):
        self._require_fit()
        d = self.distances(q, k)
        if self.mode == "threshold":
            if self.quantile >= 1.0:
                return torch.ones_like(d, dtype=torch.bool)
            return d <= self.thresholds().to(d.device).view(1, -1, 1, 1)
        return topk_graph(-d, self.k, None if valid is None else full_valid(valid, tuple(d.shape), d.device))

    def grid(self, n: int) -> list:
        if self.mode == "threshold":
            return [1.0, 0.6, 0.4, 0.3, 0.2, 0.15, 0.1, 0.07, 0.05, 0.03, 0.02, 0.01]
        return int_grid(n, [64, 48, 32, 24, 16, 12, 8, 6, 4, 3, 2, 1])

    def cost(self, n: int, pairs: Optional[float] = None) -> float:
        """Projection of n queries and n keys (2 n r units) + an r-dim distance per candidate pair (pairs r / d_head)
        + selection: a threshold test per pair (pairs / d_head) or top-k per query (pairs log2 k / d_head)."""
        dh = self.d_head or 64
        r = self.projector.rank
        pairs = float(n * n) if pairs is None else float(pairs)
        sel = pairs / dh if self.mode == "threshold" else select_cost(pairs, self.k, dh)
        return 2.0 * n * r + pairs * r / dh + sel

    def compute_ops(self, q, k, valid=None):
        """The authors count every pairwise distance: n^2 per head (computation sparsity 0)."""
        return torch.full((q.shape[0], q.shape[1]), float(q.shape[2] * k.shape[2]), dtype=torch.float64)
