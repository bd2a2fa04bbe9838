"""A learned low-rank scorer trained with a ranking loss over all keys (attnlab's predictor, beyond the paper).

Per head, predicted scores s'_ij = (q_i W_q) . (k_j W_k) + u . k_j with W_q, W_k: d_head x r and a per-key
"popularity" vector u (attention sinks such as [CLS] / [SEP] become one dot product per key). Inputs are
standardised per head; W_q = W_k start at the top-r eigenvectors of the pooled q/k second moment (so s' starts
as the rank-r part of the true score) and are trained with Adam on the gold graph with a softmax ranking loss
over *all* valid keys of each query:

    loss_i = mean over gold j of  -log( exp(s'_ij) / (exp(s'_ij) + sum over non-gold valid j' of exp(s'_ij')) )

which asks each gold key to outrank every non-gold key of its row (not only a sampled few, as the distance
predictor's margin loss does).

Selection (``mode``): ``"gap"`` keeps keys whose predicted score is within a per-head gap of the row maximum --
the shape of the entmax support itself, which is {j : s_ij > tau_i} with tau_i >= max_j s_ij - 1/(alpha-1);
``"knn"`` keeps the top-k per query. The knob is a *budget* (``density``: mean share of valid pairs kept); it is
split over heads in proportion to each head's gold density on the fit data (per-head budgets), and each head's
gap threshold is calibrated on the fit data to meet its share.

Cost per head: projections 2 n r + key bias n + a rank-r score per candidate pair (pairs r / d_head) + selection
(row max and a comparison per pair: 2 pairs / d_head; knn: pairs log2 k / d_head).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from ...distributed import WindowShard
from ...errors import ConfigError
from ..graphs import check_qk, full_valid
from .base import BasePredictor, select_cost
from .dataparallel import CALIB, fit_minibatches, global_sum, head_std, pooled_sample, shard_of


class RankPredictor(BasePredictor):
    """Low-rank bilinear scorer + key bias, ranking loss on the gold graph, per-head budgets. Knob: ``density``."""

    name = "rank"
    knob = "density"

    def __init__(self, rank: int = 8, density: float = 0.1, mode: str = "gap", epochs: int = 20, lr: float = 1e-2,
                 batch_size: int = 8, seed: int = 0, per_head_budget: bool = True, calib_samples: int = 200_000,
                 **_ignored):
        super().__init__()
        self.rank, self.density, self.mode, self.epochs, self.lr = rank, density, mode, epochs, lr
        self.batch_size, self.seed, self.per_head_budget, self.calib_samples = batch_size, seed, per_head_budget, calib_samples
        self.name = "rank" if mode == "gap" else "rank-knn"
        self.wq: Optional[Tensor] = None  # (H, dh, r)
        self.wk: Optional[Tensor] = None
        self.u: Optional[Tensor] = None  # (H, dh)
        self.scale: Optional[Tensor] = None  # (H, 1, 1)
        self.gold_density: Optional[Tensor] = None  # (H,) on the fit data
        self._gaps: Optional[Tensor] = None  # (H, S) sorted sample of fitted gaps to the row max
        self.history: list[float] = []
        self._thresholds: dict = {}  # (gaps, density, per-head) -> thresholds, shared by with_knob copies
        self._check()

    def _check(self) -> None:
        if self.mode not in ("gap", "knn"):
            raise ConfigError(f"rank: mode must be gap or knn (got {self.mode!r})")
        if self.rank < 1 or self.epochs < 0 or self.lr <= 0 or self.batch_size < 1:
            raise ConfigError(f"rank: --rank >= 1, --epochs >= 0, lr > 0, batch size >= 1 required "
                              f"(got {self.rank}, {self.epochs}, {self.lr}, {self.batch_size})")
        if not 0.0 < float(self.density) <= 1.0:
            raise ConfigError(f"rank: density must be in (0, 1] (got {self.density})")

    # -- scoring --------------------------------------------------------------------------------------------
    def scores(self, q: Tensor, k: Tensor) -> Tensor:
        """Predicted scores (B, H, Nq, Nk), float32."""
        self._require_fit()
        dev = q.device
        qs, ks = q.float() / self.scale.to(dev), k.float() / self.scale.to(dev)
        pq, pk = qs @ self.wq.to(dev), ks @ self.wk.to(dev)
        bias = (ks * self.u.to(dev).unsqueeze(1)).sum(-1)  # (B, H, Nk)
        return pq @ pk.transpose(-1, -2) + bias.unsqueeze(-2)

    @staticmethod
    def _gap(s: Tensor, v: Tensor) -> Tensor:
        """Gap to the row maximum over valid keys (inf where invalid)."""
        s = s.masked_fill(~v, float("-inf"))
        m = s.amax(-1, keepdim=True)
        return torch.where(v, m - s, torch.full_like(s, float("inf")))

    # -- fitting ---------------------------------------------------------------------------------------------
    def fit(self, q: Tensor, k: Tensor, gold: Tensor, valid: Optional[Tensor] = None,
            shard: Optional[WindowShard] = None) -> "RankPredictor":
        """Train W_q, W_k, u with the ranking loss on one layer's q, k (B, H, N, dh) and gold graph; calibrate gaps.

        ``shard``: data-parallel over every rank's windows (see :mod:`.dataparallel`); training runs in float64,
        the learned tensors are stored as float32."""
        super().fit(q, k, gold, valid)
        check_qk(q, k)
        B, H, N, dh = q.shape
        shard = shard_of(shard, B)
        r = min(self.rank, dh)
        g = torch.Generator().manual_seed(self.seed)
        q, k, gold = q.detach().float().cpu(), k.detach().float().cpu(), gold.bool().cpu()
        v = full_valid(None if valid is None else valid.cpu(), tuple(gold.shape))
        scale = head_std(shard, torch.cat([q, k], dim=2)).clamp(min=1e-6).view(H, 1, 1)
        qs, ks = q.double() / scale, k.double() / scale
        x = torch.cat([qs, ks], dim=2).transpose(0, 1).reshape(H, -1, dh)
        xtx, count = global_sum(shard, x.transpose(1, 2) @ x, torch.tensor(float(x.shape[1])))
        evecs = torch.linalg.eigh(xtx / count).eigenvectors[..., -r:]  # (H, dh, r), top-r
        # scale so that s' starts at the true score's size (q.k / sqrt(dh) in standardised units times scale^2)
        init = evecs * (scale.view(H, 1, 1) ** 2 / math.sqrt(dh)) ** 0.5
        wq, wk = init.clone().requires_grad_(), init.clone().requires_grad_()
        u = torch.zeros(H, dh, dtype=torch.float64, requires_grad=True)
        opt = torch.optim.Adam([wq, wk, u], lr=self.lr)
        g_pos = gold & v

        def batch_loss(idx: list[int], glob: list[int], epoch: int):
            s = (qs[idx] @ wq) @ (ks[idx] @ wk).transpose(-1, -2) + (ks[idx] * u.unsqueeze(1)).sum(-1).unsqueeze(-2)
            pos, vv = g_pos[idx], v[idx]
            neg = vv & ~pos
            lse_neg = s.masked_fill(~neg, float("-inf")).logsumexp(-1, keepdim=True)  # (b, H, N, 1)
            # -log(e^s / (e^s + sum_neg)) = softplus(lse_neg - s); rows without negatives contribute 0
            per = torch.nn.functional.softplus(lse_neg - s)
            per = torch.where(torch.isfinite(lse_neg) & pos, per, torch.zeros_like(per))
            npos = pos.sum(-1)
            rows = npos > 0
            if not bool(rows.any()):
                return None, 0
            return (per.sum(-1)[rows] / npos[rows]).sum(), int(rows.sum())

        self.history = fit_minibatches([wq, wk, u], opt, shard, self.epochs, self.batch_size, g, batch_loss)
        self._thresholds.clear()
        self.scale = scale.float()
        self.wq, self.wk, self.u = wq.detach().float(), wk.detach().float(), u.detach().float()
        with torch.no_grad():
            n_pos, n_valid = global_sum(shard, g_pos.sum(dim=(0, 2, 3)), v.sum(dim=(0, 2, 3)))
            self.gold_density = (n_pos / n_valid.clamp(min=1)).float()
            per_window = []
            for s0 in range(0, B, self.batch_size):
                sl = slice(s0, s0 + self.batch_size)
                gap = self._gap(self.scores(q[sl], k[sl]), v[sl])
                # the valid mask is shared by heads: one (H, M_b) block of finite gaps per window
                per_window += [x[:, vb[0]] for x, vb in zip(gap, v[sl])]
            self._gaps = pooled_sample(shard, per_window, self.calib_samples, self.seed, CALIB).sort(dim=1).values
        return self

    # -- budgets and prediction --------------------------------------------------------------------------------
    def head_density(self) -> Tensor:
        """Per-head share of valid pairs to keep (H,): the budget split in proportion to the heads' gold density."""
        self._require_fit()
        H = self.gold_density.shape[0]
        d = float(self.density)
        if not self.per_head_budget or d >= 1.0:
            return torch.full((H,), d)
        w = self.gold_density.clamp(min=1e-6)
        out = torch.full((H,), d)
        for _ in range(20):  # proportional split, capped at 1, renormalised over the uncapped heads
            free = out < 1.0
            rest = d * H - float((~free).sum())
            if rest <= 0 or not bool(free.any()):
                break
            out = torch.where(free, rest * w / w[free].sum(), out).clamp(max=1.0)
        return out

    def thresholds(self) -> Tensor:
        """Per-head gap thresholds (H,) meeting ``head_density`` on the fit data (cached per budget; the cache is
        shared by the ``with_knob`` copies, so a sweep computes each knob's quantiles once)."""
        self._require_fit()
        key = (self._gaps.data_ptr(), tuple(self._gaps.shape), float(self.density), bool(self.per_head_budget))
        if key not in self._thresholds:
            dens = self.head_density()
            out = torch.empty_like(dens)
            for h in range(len(dens)):
                out[h] = float("inf") if dens[h] >= 1.0 else torch.quantile(self._gaps[h], float(dens[h]))
            self._thresholds[key] = out
        return self._thresholds[key]

    def _predict(self, q, k, valid):
        self._require_fit()
        s = self.scores(q, k)
        v = full_valid(None if valid is None else valid, tuple(s.shape), s.device)
        if float(self.density) >= 1.0:
            return torch.ones_like(s, dtype=torch.bool)
        if self.mode == "gap":
            return self._gap(s, v) <= self.thresholds().to(s.device).view(1, -1, 1, 1)
        n_valid = v.sum(-1, keepdim=True).float()  # (B, H, N, 1)
        kh = (self.head_density().to(s.device).view(1, -1, 1, 1) * n_valid).ceil().long().clamp(min=1)
        order = s.masked_fill(~v, float("-inf")).argsort(-1, descending=True).argsort(-1)
        return order < kh

    def grid(self, n: int) -> list:
        return [1.0, 0.6, 0.4, 0.3, 0.25, 0.2, 0.15, 0.12, 0.1, 0.08, 0.06, 0.05, 0.04, 0.03, 0.02]

    def cost(self, n: int, pairs: Optional[float] = None) -> float:
        """Projections 2 n r + key bias n + rank-r scores (pairs r / d_head) + selection (see module docstring)."""
        dh = self.d_head or 64
        r = min(self.rank, dh)
        pairs = float(n * n) if pairs is None else float(pairs)
        k = max(1.0, float(self.density) * n)
        sel = 2.0 * pairs / dh if self.mode == "gap" else select_cost(pairs, k, dh)
        return 2.0 * n * r + n + pairs * r / dh + sel

    def compute_ops(self, q, k, valid=None):
        """Every candidate pair gets a rank-r score: n^2 per head, as the authors count distance predictors."""
        return torch.full((q.shape[0], q.shape[1]), float(q.shape[2] * k.shape[2]), dtype=torch.float64)

    def state(self) -> dict[str, Tensor]:
        """Learned tensors (for safetensors)."""
        return {"wq": self.wq, "wk": self.wk, "u": self.u, "scale": self.scale, "gold_density": self.gold_density,
                "gaps": self._gaps}

    def load_state(self, t: dict[str, Tensor]) -> None:
        """Restore what :meth:`state` returned."""
        self.wq, self.wk, self.u, self.scale = t["wq"], t["wk"], t["u"], t["scale"]
        self.gold_density, self._gaps = t["gold_density"], t["gaps"]
        self.d_head, self.fitted = int(self.wq.shape[1]), True
