"""Block-level attention-pattern predictors that work on q, k directly (no N x N token graph).

Token-level (N, N) graphs are impossible at N = 32k-64k, so the GPU path predicts which (query block, key
block) tiles carry the attention mass and hands FlexAttention that block list (see ``blockmask.py``).

Predictors (all seeded; every random choice takes ``seed``):

* :class:`PooledBlockPredictor` -- Sparsefinder-style: optionally project q and k to ``rank`` dims (random
  Gaussian, or the principal directions of the logit matrix fitted from a row sample: ``proj='lowrank'``),
  mean-pool them over sub-blocks of ``pool`` tokens, score every sub-block pair (pooled q . pooled k *
  scale), reduce the sub-block pairs of each (block_size x block_size) tile by ``max``, ``mean`` or ``lse``,
  and keep per query block the top ``budget`` tiles -- or, with ``mass``, the fewest tiles whose estimated
  softmax mass (lse-reduced scores, softmax over the row of tiles) reaches ``mass``, capped by ``budget``.
  The diagonal tile and the first ``sink_blocks`` key tiles are always kept (local window + attention sinks).
  Cost: N*d*r (projection) + H*(N/pool)^2*r (scores) + one top-k over (N/bs)^2 tiles.
* :class:`ClusterBlockPredictor` -- Routing-Transformer / Reformer style: spherical k-means (or random
  hyperplane LSH) on q and k with shared centroids; tokens are sorted by cluster id so that same-cluster
  pairs become dense diagonal tiles, the output is scattered back with the inverse permutation. Optionally
  an ``inner`` pooled predictor adds top tiles scored in the sorted order. ``assign(q, k)`` follows the
  issue-4 protocol ((B, H, N, n_hash) int ids).
* :class:`AssignBlockPredictor` -- wraps any issue-4 predictor that has ``assign(q, k) -> (q_ids, k_ids)``
  (one hash round is used: one permutation per call).

Semantics of the returned :class:`~attnlab.blocksparse.blockmask.BlockPattern` are documented there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from attnlab.errors import ConfigError, ShapeError
from attnlab.blocksparse.blockmask import BlockPattern, KVBlocks, cluster_pattern, permute_tokens, topk_to_kv
from attnlab.blocksparse.contracts import check_int, check_qk, check_scale

__all__ = [
    "BlockPredictor",
    "PooledBlockPredictor",
    "ClusterBlockPredictor",
    "AssignBlockPredictor",
    "budget_blocks",
    "lowrank_projections",
]


@runtime_checkable
class BlockPredictor(Protocol):
    """Anything that turns (q, k) into a block pattern."""

    def predict_blocks(self, q: Tensor, k: Tensor, block_size: int = 128, causal: bool = False) -> BlockPattern:
        """q, k (B, H, N, D) -> :class:`BlockPattern`."""
        ...


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


def _check_qk(q: Tensor, k: Tensor) -> None:
    check_qk(q, k)


def _check_call(q: Tensor, k: Tensor, block_size: Any, scale: Any) -> None:
    """The shared contract of every ``predict_blocks``: q, k, a positive int block_size, a finite scale."""
    check_qk(q, k)
    check_int(block_size, "block_size")
    check_scale(scale)


def _sample_rows(n: int, m: int, seed: int, device: torch.device) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    if m >= n:
        return torch.arange(n, device=device)
    return torch.randperm(n, generator=g)[:m].sort().values.to(device)


def lowrank_projections(q: Tensor, k: Tensor, rank: int, rows: int = 2048, seed: int = 0,
                        ridge: float = 1e-4) -> tuple[Tensor, Tensor]:
    """Fit per-head projections (H, D, r) so that (q Pq) . (k Pk) is the best rank-r approximation of q . k
    over a row sample (SVD of the logit matrix through Cholesky factors of q^T q and k^T k)."""
    _check_qk(q, k)
    B, H, N, D = q.shape
    r = min(rank, D)
    idx = _sample_rows(N, rows, seed, q.device)
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
class PooledBlockPredictor:
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
        check_int(self.pool, "pool")
        check_int(self.rank, "rank")
        check_int(self.fit_rows, "fit_rows")
        check_int(self.head_chunk, "head_chunk")
        check_int(self.sink_blocks, "sink_blocks", lo=0)
        check_int(self.local_blocks, "local_blocks", lo=-1)
        budget_blocks(self.budget, 1 << 30)  # type and range now, not at the first call

    # -- projections ---------------------------------------------------------------------------------
    def fit(self, q: Tensor, k: Tensor) -> "PooledBlockPredictor":
        """Fix the projections from calibration q, k (B, H, N, D); 'none' needs no fit."""
        _check_qk(q, k)
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
        _check_qk(q, k)
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
        fails, ``compile`` is switched off with a warning and the eager path is used."""
        _check_call(q, k, block_size, scale)
        if self.compile and q.is_cuda and not (self.proj == "lowrank" and self.pq is None):
            try:
                kv = _compiled_predict_kv()(self, q, k, block_size, causal, scale)
                return BlockPattern(kv, block_size, causal)
            except Exception as e:  # pragma: no cover - depends on the torch build
                import warnings

                warnings.warn(f"compiled block prediction failed ({type(e).__name__}: {e}); using eager")
                self.compile = False
        return BlockPattern(self.predict_kv(q, k, block_size, causal, scale), block_size, causal)

    def cost(self, n: int, d: int, block_size: int = 128) -> float:
        """Multiply-adds per head for one prediction at length n."""
        r = d if self.proj == "none" else self.rank
        proj = 0 if self.proj == "none" else 2 * n * d * r
        return proj + (n / self.pool) ** 2 * r


_COMPILED: dict[str, Any] = {}


def _predict_kv_fn(pred: "PooledBlockPredictor", q: Tensor, k: Tensor, block_size: int, causal: bool,
                   scale: float | None) -> KVBlocks:
    return pred.predict_kv(q, k, block_size, causal, scale)


def _compiled_predict_kv() -> Any:
    if "predict_kv" not in _COMPILED:
        _COMPILED["predict_kv"] = torch.compile(_predict_kv_fn, dynamic=False)
    return _COMPILED["predict_kv"]


def _masked_mean(s: Tensor) -> Tensor:
    fin = torch.isfinite(s)
    tot = torch.where(fin, s, torch.zeros((), device=s.device)).sum(dim=(3, 5))
    cnt = fin.sum(dim=(3, 5)).clamp_min(1)
    return torch.where(fin.any(dim=5).any(dim=3), tot / cnt, torch.full_like(tot, float("-inf")))


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
    inner: PooledBlockPredictor | None = None
    seed: int = 0
    centroids: Tensor | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.method not in ("kmeans", "lsh"):
            raise ConfigError(f"method must be 'kmeans' or 'lsh', got {self.method!r}")
        check_int(self.n_clusters, "n_clusters")
        check_int(self.iters, "iters", lo=0)
        check_int(self.fit_rows, "fit_rows", lo=2)

    def fit(self, q: Tensor, k: Tensor) -> "ClusterBlockPredictor":
        """Fit centroids (H, C, D) (kmeans) or hyperplanes (H, D, bits) (lsh) from q, k."""
        _check_qk(q, k)
        B, H, N, D = q.shape
        g = torch.Generator().manual_seed(self.seed)
        if self.method == "lsh":
            bits = max(1, math.ceil(math.log2(self.n_clusters)))
            self.centroids = torch.randn(H, D, bits, generator=g).to(q.device)
            return self
        idx = _sample_rows(N, self.fit_rows // 2, self.seed, q.device)
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
        """Issue-4 protocol: q, k (B, H, N, D) -> (q_ids, k_ids) (B, H, N, 1) int64. Without a prior
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
        _check_call(q, k, block_size, scale)
        q_ids, k_ids = self.assign(q, k)
        return _pattern_from_ids(q, k, q_ids[..., 0], k_ids[..., 0], block_size, causal, self.inner, scale)

    def cost(self, n: int, d: int, block_size: int = 128) -> float:
        """Multiply-adds per head (assignment + optional inner scoring; the fit is extra)."""
        c = n * d * self.n_clusters * 2
        return c + (self.inner.cost(n, d, block_size) if self.inner is not None else 0.0)


def _pattern_from_ids(q: Tensor, k: Tensor, q_ids: Tensor, k_ids: Tensor, block_size: int, causal: bool,
                      inner: PooledBlockPredictor | None, scale: float | None) -> BlockPattern:
    extra = None
    if inner is not None:
        from attnlab.blocksparse.blockmask import cluster_permutation

        qp, _ = cluster_permutation(q_ids)
        kp, _ = cluster_permutation(k_ids)
        # causal filtering happens in cluster_pattern (positions); score non-causally in sorted order
        inner_pat = inner.predict_blocks(permute_tokens(q, qp), permute_tokens(k, kp), block_size, False, scale)
        extra = inner_pat.block_graph()
    return cluster_pattern(q_ids, k_ids, block_size, causal, extra)


@dataclass
class AssignBlockPredictor:
    """Adapter: any predictor with ``assign(q, k) -> (q_ids, k_ids)`` of shape (B, H, N, n_hash) (issue 4's
    bucket/cluster predictors) -> permuted block pattern. Uses hash round ``round`` (a single permutation
    per call; several rounds would need several attention calls merged by log-sum-exp)."""

    predictor: Any
    round: int = 0
    inner: PooledBlockPredictor | None = None

    def predict_blocks(self, q: Tensor, k: Tensor, block_size: int = 128, causal: bool = False,
                       scale: float | None = None) -> BlockPattern:
        """q, k -> permuted :class:`BlockPattern` from the wrapped predictor's bucket ids."""
        _check_call(q, k, block_size, scale)
        q_ids, k_ids = self.predictor.assign(q, k)
        if q_ids.dim() == 3:
            q_ids, k_ids = q_ids.unsqueeze(-1), k_ids.unsqueeze(-1)
        return _pattern_from_ids(q, k, q_ids[..., self.round].long(), k_ids[..., self.round].long(),
                                 block_size, causal, self.inner, scale)
