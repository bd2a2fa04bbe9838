"""The pooled block predictors: mean-pooled (optionally projected) q and k scored per tile.

* :class:`PooledBudgetPredictor` -- Sparsefinder-style, budgeted: optionally project q and k to ``rank`` dims
  (random Gaussian, or the principal directions of the logit matrix fitted from a row sample:
  ``proj='lowrank'``), mean-pool them over sub-blocks of ``pool`` tokens, score every sub-block pair (pooled
  q . pooled k * scale), reduce the sub-block pairs of each (block_size x block_size) tile by ``max``, ``mean``
  or ``lse``, and keep per query block the top ``budget`` tiles -- or, with ``mass``, the fewest tiles whose
  estimated softmax mass (lse-reduced scores, softmax over the row of tiles) reaches ``mass``, capped by
  ``budget``. The diagonal tile and the first ``sink_blocks`` key tiles are always kept (local window +
  attention sinks). ``sparse_attention``'s default predictor. Cost: N*d*r (projection) + H*(N/pool)^2*r
  (scores) + one top-k over (N/bs)^2 tiles.
* :class:`PooledMassPredictor` -- registered as ``pooled``: the log-sum-exp of each tile's pooled scores
  estimates its log mass; softmax over a query block's tiles gives the estimated mass; tiles are kept per
  query block, largest first, until the estimate reaches the knob ``tau`` (calibrated per head to a recall
  target; diagonal and first key block always kept). Cost: (N/pool)^2 * D per head.

Semantics of the returned :class:`~attnlab.blocksparse.blockmask.BlockPattern` are documented there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from attnlab.errors import ConfigError, ShapeError
from attnlab.blocksparse.blockmask import BlockPattern, KVBlocks, topk_to_kv
from attnlab.blocksparse import contracts
from attnlab.blocksparse.compiled import call_compiled
from attnlab.blocksparse.recall import sample_rows

from .core import ScoredBlockMethod, mass_thresholds
from .registry import BLOCK_PREDICTORS

__all__ = [
    "PooledBudgetPredictor",
    "PooledMassPredictor",
    "budget_blocks",
    "lowrank_projections",
    "check_qk",
]


def budget_blocks(budget: float | int, nk: int) -> int:
    """Budget as a fraction of key blocks (float in (0, 1]) or a block count (int >= 1) -> blocks per row."""
    if isinstance(budget, bool) or budget is None:
        raise ConfigError(f"budget must be a fraction in (0, 1] or a block count, got {budget!r}")
    if isinstance(budget, int):
        if budget < 1:
            raise ConfigError(f"budget as a block count must be >= 1, got {budget}")
        return min(budget, nk)
    if not 0.0 < float(budget) <= 1.0:
        raise ConfigError(f"budget as a fraction must be in (0, 1], got {budget}")
    return max(1, min(nk, math.ceil(float(budget) * nk - 1e-9)))


def check_qk(q: Tensor, k: Tensor) -> None:
    """q and k float (B, H, N, D) with equal B, H, D, dtype and device (else ShapeError naming the argument)."""
    contracts.check_qk(q, k)


def check_call(q: Tensor, k: Tensor, block_size: Any, scale: Any) -> None:
    """The shared contract of every ``predict_blocks``: q, k, a positive int block_size, a finite scale."""
    contracts.check_qk(q, k)
    contracts.check_int(block_size, "block_size")
    contracts.check_scale(scale)


def lowrank_projections(q: Tensor, k: Tensor, rank: int, rows: int = 2048, seed: int = 0,
                        ridge: float = 1e-4) -> tuple[Tensor, Tensor]:
    """Fit per-head projections (H, D, r) so that (q Pq) . (k Pk) is the best rank-r approximation of q . k
    over a row sample (SVD of the logit matrix through Cholesky factors of q^T q and k^T k)."""
    check_qk(q, k)
    B, H, N, D = q.shape
    r = min(rank, D)
    idx = sample_rows(N, rows, seed, None, q.device)
    qs = q[:, :, idx].float().transpose(0, 1).reshape(H, -1, D)
    ks = k[:, :, idx].float().transpose(0, 1).reshape(H, -1, D)
    eye = torch.eye(D, device=q.device)

    def chol(x: Tensor) -> Tensor:
        g = x.transpose(-1, -2) @ x
        g = g + ridge * (g.diagonal(dim1=-2, dim2=-1).mean(-1, keepdim=True).unsqueeze(-1) + 1e-6) * eye
        return torch.linalg.cholesky(g)  # g = L L^T, so x = U L^T with U orthonormal

    lq, lk = chol(qs), chol(ks)
    m = lq.transpose(-1, -2) @ lk  # Rq Rk^T with R = L^T
    u, s, vh = torch.linalg.svd(m)
    sr = s[:, :r].clamp_min(0).sqrt().unsqueeze(-2)
    pq = torch.linalg.solve_triangular(lq.transpose(-1, -2), u[:, :, :r] * sr, upper=True)
    pk = torch.linalg.solve_triangular(lk.transpose(-1, -2), vh.transpose(-1, -2)[:, :, :r] * sr, upper=True)
    return pq, pk


def _pool(x: Tensor, pool: int) -> Tensor:
    B, H, N, D = x.shape
    return x.reshape(B, H, N // pool, pool, D).mean(dim=3)


@dataclass
class PooledBudgetPredictor:
    """Pooled low-dimensional q.k scores per tile -> top tiles per query block (see module docstring).

    budget: tiles per query block (fraction of key blocks, or int count). The diagonal (and ``local_blocks``
    band) and ``sink_blocks`` tiles are always kept and count towards the budget; when the budget is smaller
    than them (e.g. the default 0.1 at N <= 1024 with 128-token tiles) a row computes just those forced tiles,
    so every token always sees its own block and the sinks. mass: if set, keep the fewest
    tiles reaching this estimated mass (capped by budget). proj: 'none' | 'random' | 'lowrank'. rank: target
    dims for 'random'/'lowrank'. pool: sub-block size (divides block_size). reduce: 'max' | 'mean' | 'lse'
    (ranking); the mass estimate always uses lse. sink_blocks: first key blocks always kept. local_blocks:
    key blocks within this distance of the diagonal always kept (0 = diagonal only, -1 = none).
    head_chunk: heads scored at once (bounds the (N/pool)^2 score memory)."""

    budget: float | int = 0.1
    mass: float | None = None
    proj: str = "none"
    rank: int = 32
    pool: int = 32
    reduce: str = "max"
    sink_blocks: int = 1
    local_blocks: int = 0
    fit_rows: int = 2048
    head_chunk: int = 8
    seed: int = 0
    compile: bool = False
    pq: Tensor | None = field(default=None, repr=False)
    pk: Tensor | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.proj not in ("none", "random", "lowrank"):
            raise ConfigError(f"proj must be 'none', 'random' or 'lowrank', got {self.proj!r}")
        if self.reduce not in ("max", "mean", "lse"):
            raise ConfigError(f"reduce must be 'max', 'mean' or 'lse', got {self.reduce!r}")
        if self.mass is not None and not 0.0 < self.mass <= 1.0:
            raise ConfigError(f"mass must be in (0, 1], got {self.mass}")
        for name in ("pool", "rank", "fit_rows", "head_chunk"):
            contracts.check_int(getattr(self, name), name)
        contracts.check_int(self.sink_blocks, "sink_blocks", lo=0)
        contracts.check_int(self.local_blocks, "local_blocks", lo=-1)
        budget_blocks(self.budget, 1 << 30)  # type and range now, not at the first call

    # -- projections ---------------------------------------------------------------------------------
    def fit(self, q: Tensor, k: Tensor) -> "PooledBudgetPredictor":
        """Fix the projections from calibration q, k (B, H, N, D); 'none' needs no fit."""
        check_qk(q, k)
        H, D = q.shape[1], q.shape[-1]
        if self.proj == "random":
            g = torch.Generator().manual_seed(self.seed)
            p = torch.randn(H, D, self.rank, generator=g) / math.sqrt(self.rank)
            self.pq = self.pk = p.to(q.device)
        elif self.proj == "lowrank":
            self.pq, self.pk = lowrank_projections(q, k, self.rank, self.fit_rows, self.seed)
        return self

    def _project(self, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        if self.proj == "none":
            return q, k
        pq, pk = self.pq, self.pk
        if pq is None or pq.shape[0] != q.shape[1] or pq.shape[1] != q.shape[-1]:
            # not fitted: fit on these inputs (counted in the prediction time by callers), don't keep it
            # unless it is data-independent ('random')
            saved = (self.pq, self.pk)
            self.fit(q, k)
            pq, pk = self.pq, self.pk
            if self.proj == "lowrank":
                self.pq, self.pk = saved
        pq = pq.to(device=q.device, dtype=q.dtype)
        pk = pk.to(device=k.device, dtype=k.dtype)
        return torch.matmul(q, pq.unsqueeze(0)), torch.matmul(k, pk.unsqueeze(0))

    # -- scores --------------------------------------------------------------------------------------
    def tile_scores(self, q: Tensor, k: Tensor, block_size: int = 128, causal: bool = False,
                    scale: float | None = None, reductions: tuple[str, ...] = ("max",)) -> dict[str, Tensor]:
        """Tile scores {reduction: (B, H, nq, nk) float32} from ONE pooled score matrix per head chunk
        (causal: future tiles -inf). 'lse' includes log(pool^2): an estimate of the tile's log mass."""
        check_qk(q, k)
        B, H, N, D = q.shape
        M = k.shape[2]
        pool = min(self.pool, block_size)
        if block_size % pool or N % block_size or M % block_size:
            raise ShapeError(f"need pool | block_size | N, got pool={pool}, block_size={block_size}, N={N}, M={M}")
        for r in reductions:
            if r not in ("max", "mean", "lse"):
                raise ConfigError(f"unknown reduction {r!r}")
        scale = D ** -0.5 if scale is None else scale
        sub = block_size // pool
        nq, nk = N // block_size, M // block_size
        qp, kp = self._project(q, k)
        qp, kp = _pool(qp, pool) * scale, _pool(kp, pool)  # (B, H, N/pool, r), scale folded into q
        out = {r: torch.empty(B, H, nq, nk, dtype=torch.float32, device=q.device) for r in reductions}
        fut = None
        if causal:
            t = torch.arange(N // pool, device=q.device)
            fut = t.view(-1, 1) < t.view(1, -1)  # sub-block pairs strictly in the future
        for h0 in range(0, H, self.head_chunk):
            h1 = min(H, h0 + self.head_chunk)
            s = torch.matmul(qp[:, h0:h1], kp[:, h0:h1].transpose(-1, -2))
            if fut is not None:
                s = s.masked_fill(fut, float("-inf"))
            s = s.view(B, h1 - h0, nq, sub, nk, sub)
            mx = s.amax(dim=(3, 5), keepdim=True)
            if "max" in reductions:
                out["max"][:, h0:h1] = mx.view(B, h1 - h0, nq, nk)
            if "mean" in reductions:
                out["mean"][:, h0:h1] = s.float().mean(dim=(3, 5)) if fut is None else _masked_mean(s.float())
            if "lse" in reductions:
                mxf = mx.float()
                safe = torch.where(torch.isfinite(mxf), mxf, torch.zeros((), device=q.device))
                tot = torch.exp(s.float() - safe).sum(dim=(3, 5), keepdim=True)
                lse = (safe + torch.log(tot)).view(B, h1 - h0, nq, nk) + 2 * math.log(pool)
                out["lse"][:, h0:h1] = lse
        if causal:
            fut_t = torch.ones(nq, nk, dtype=torch.bool, device=q.device).triu_(1)
            for r in out:
                out[r] = out[r].masked_fill(fut_t, float("-inf"))
        return out

    def block_scores(self, q: Tensor, k: Tensor, block_size: int = 128, causal: bool = False,
                     scale: float | None = None, reduce: str | None = None) -> Tensor:
        """Tile scores (B, H, nq, nk) float32 with this predictor's (or the given) reduction."""
        r = reduce or self.reduce
        return self.tile_scores(q, k, block_size, causal, scale, (r,))[r]

    def _forced(self, nq: int, nk: int, device: torch.device) -> Tensor | None:
        f = torch.zeros(nq, nk, dtype=torch.bool, device=device)
        if self.local_blocks >= 0:
            i = torch.arange(nq, device=device).view(-1, 1)
            j = torch.arange(nk, device=device).view(1, -1)
            f |= (i - j).abs() <= self.local_blocks
        if self.sink_blocks > 0:
            f[:, : self.sink_blocks] = True
        return f

    def select(self, scores: Tensor, causal: bool = False, mass_scores: Tensor | None = None) -> KVBlocks:
        """Tile scores (B, H, nq, nk) -> kept tiles (top budget, or mass threshold capped by budget)."""
        B, H, nq, nk = scores.shape
        kb = budget_blocks(self.budget, nk)
        forced = self._forced(nq, nk, scores.device)
        live = forced if not causal else forced & torch.ones_like(forced).tril_()
        nforced = live.sum(-1, dtype=torch.int32).view(1, 1, nq)  # forced tiles that can be computed
        # forced tiles are always kept: a row computes max(budget, forced) tiles (no host sync: the bound is
        # known from the band and sink widths)
        kmax = min(nk, max(kb, 2 * max(self.local_blocks, 0) + 1 + self.sink_blocks))
        if self.mass is not None:
            ms = scores if mass_scores is None else mass_scores
            p = torch.softmax(ms, dim=-1)
            ps = torch.sort(p, dim=-1, descending=True).values
            before = torch.cumsum(ps, dim=-1) - ps  # mass of the tiles ranked above
            cnt = (before < self.mass).sum(-1, dtype=torch.int32)
            k = torch.maximum((cnt + nforced).clamp(1, kb), nforced)
        else:
            k = torch.clamp(nforced, min=kb).expand(B, H, nq)
        return topk_to_kv(scores, k, causal=causal, force=forced, kmax=kmax)

    def predict_kv(self, q: Tensor, k: Tensor, block_size: int = 128, causal: bool = False,
                   scale: float | None = None) -> KVBlocks:
        """q, k -> kept tiles as :class:`KVBlocks` (pure tensor function: compilable, no host sync)."""
        want = (self.reduce,) if self.mass is None or self.reduce == "lse" else (self.reduce, "lse")
        sc = self.tile_scores(q, k, block_size, causal, scale, want)
        return self.select(sc[self.reduce], causal, sc.get("lse"))

    def predict_blocks(self, q: Tensor, k: Tensor, block_size: int = 128, causal: bool = False,
                       scale: float | None = None) -> BlockPattern:
        """q, k (B, H, N, D) -> :class:`BlockPattern` in the original token order. With ``compile`` (CUDA
        only) the scoring + selection run as one ``torch.compile``d graph (fewer launches); if compiling
        fails, the compiled path is switched off with a warning and the eager path is used."""
        check_call(q, k, block_size, scale)
        if self.compile and q.is_cuda and not (self.proj == "lowrank" and self.pq is None):
            kv = call_compiled("predict_kv", _predict_kv_fn, self, q, k, block_size, causal, scale)
            return BlockPattern(kv, block_size, causal)
        return BlockPattern(self.predict_kv(q, k, block_size, causal, scale), block_size, causal)

    def cost(self, n: int, d: int, block_size: int = 128) -> float:
        """Multiply-adds per head for one prediction at length n."""
        r = d if self.proj == "none" else self.rank
        proj = 0 if self.proj == "none" else 2 * n * d * r
        return proj + (n / self.pool) ** 2 * r


def _predict_kv_fn(pred: "PooledBudgetPredictor", q: Tensor, k: Tensor, block_size: int, causal: bool,
                   scale: float | None) -> KVBlocks:
    return pred.predict_kv(q, k, block_size, causal, scale)


def _masked_mean(s: Tensor) -> Tensor:
    fin = torch.isfinite(s)
    tot = torch.where(fin, s, torch.zeros((), device=s.device)).sum(dim=(3, 5))
    cnt = fin.sum(dim=(3, 5)).clamp_min(1)
    return torch.where(fin.any(dim=5).any(dim=3), tot / cnt, torch.full_like(tot, float("-inf")))


@BLOCK_PREDICTORS.register("pooled", help="ours: pooled q.k log-sum-exp tile mass, cumulative threshold",
                           tags=("ours",))
@dataclass
class PooledMassPredictor(ScoredBlockMethod):
    """Pooled tile-mass estimate; knob = cumulative threshold tau per head."""

    pool: int = 32

    def prepare(self, q: Tensor, k: Tensor, causal: bool, block_size: int, scale: float) -> tuple[Any, float]:
        """Estimated tile mass: softmax over each query block's lse tile scores."""
        B, H, N, D = q.shape
        lse = pooled_lse(q, k, self.pool, block_size, causal, scale)
        pool = min(self.pool, block_size)
        return torch.softmax(lse, dim=-1), float(B * H * (N / pool) * (k.shape[2] / pool) * D) * (
            0.5 if causal else 1.0)

    def thresholds(self, state: Any, causal: bool, block_size: int) -> Tensor:
        """Tiles until the estimated mass reaches tau."""
        return mass_thresholds(state, causal, sink_blocks=1)


def pooled_lse(q: Tensor, k: Tensor, pool: int, block_size: int, causal: bool, scale: float) -> Tensor:
    """Estimated log mass (B, H, nq, nk) of every tile: lse of its pooled scores plus log(pool^2)."""
    return PooledBudgetPredictor(pool=pool).tile_scores(q, k, block_size, causal, scale, ("lse",))["lse"]
