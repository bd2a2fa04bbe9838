"""Pair-selection strategies: which query-key scores are computed exactly (the rest are estimated).

A selection is a LongTensor of key indices, sorted and unique along the last axis, of shape
``(b,)`` (one set of columns shared by every row), ``(N, b)`` (one set per query position, shared by
the batch) or ``(B, N, b)`` (one set per row). Everything here works on one (layer, head) at a time.

Fixed strategies (random per row, shared columns, evenly spaced, local window + global columns,
leverage / pivoted QR on the fitted eigenbasis) do not look at the input. The adaptive strategy ranks
keys per row by a cheap low-dimensional proxy of the score, ``(q W_q)(k W_k)^T`` with r << d_head,
and computes the top-b exactly (Sparsefinder-style); ``oracle`` ranks by the true scores and is only
an upper-bound reference (it needs every score).
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from scipy.linalg import qr as scipy_qr

from ..errors import ConfigError, ShapeError
from ..registry import Registry

#: Selection strategies by name: ``fn(n, b, **context) -> indices``. Tags: ``fixed`` (same columns for every
#: input), ``static`` (fixed and fitted once per (layer, head) from the statistics), ``adaptive`` (per row
#: from the input). A new strategy is one function plus ``@SELECTIONS.register(name, tags=...)``.
SELECTIONS: Registry = Registry("selection", "--selections")


def budget_count(budget: float | int, n: int, flag: str = "--budget", seq_flag: str = "--seq-len") -> int:
    """Pairs per row for a budget given as a fraction in (0, 1] (float) or a count >= 1 (int)."""
    if isinstance(budget, bool) or not isinstance(budget, (int, float)):
        raise ConfigError(f"{flag} must be a number (got {budget!r})")
    if isinstance(budget, float) and not budget.is_integer() or budget == 1.0 and isinstance(budget, float):
        if not 0.0 < budget <= 1.0:
            raise ConfigError(f"{flag} {budget}: a fraction must be in (0, 1]; give a count as an integer")
        return max(1, min(n, int(round(budget * n))))
    b = int(budget)
    if b < 1:
        raise ConfigError(f"{flag} must be >= 1 pair per row (got {budget})")
    if b > n:
        raise ConfigError(f"{flag} {b} exceeds {seq_flag} {n} (pairs per row cannot exceed the number of keys)")
    return b


def _check(n: int, b: int) -> None:
    if not 1 <= b <= n:
        raise ConfigError(f"--budget {b} must be in [1, {n}] for {n} keys per row")


def random_per_row(shape: tuple[int, ...], n: int, b: int, generator: Optional[torch.Generator] = None,
                   device: str | torch.device = "cpu") -> torch.Tensor:
    """An independent uniform subset of b keys for every row: (*shape, b)."""
    _check(n, b)
    r = torch.rand(*shape, n, generator=generator).to(device)
    return r.argsort(-1)[..., :b].sort(-1).values


def fixed_columns(n: int, b: int, seed: int = 0) -> torch.Tensor:
    """One random set of b key columns shared by all rows (seeded): (b,)."""
    _check(n, b)
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=g)[:b].sort().values


def evenly_spaced(n: int, b: int) -> torch.Tensor:
    """b key columns spread evenly over [0, n-1], first and last included: (b,)."""
    _check(n, b)
    if b == 1:
        return torch.zeros(1, dtype=torch.long)
    idx = torch.from_numpy(np.unique(np.round(np.linspace(0, n - 1, b)).astype(np.int64)))
    if len(idx) < b:  # only when rounding collides (b close to n): fill with the smallest unused columns
        rest = torch.tensor([j for j in range(n) if j not in set(idx.tolist())], dtype=torch.long)
        idx = torch.cat([idx, rest[: b - len(idx)]]).sort().values
    return idx


def local_window(n: int, b: int, global_cols: tuple[int, ...] = (0, -1)) -> torch.Tensor:
    """Per query position i: the global columns (default first and last token) plus the nearest keys to i: (n, b)."""
    _check(n, b)
    g = sorted({c % n for c in global_cols})[:b]
    out = torch.empty(n, b, dtype=torch.long)
    for i in range(n):
        # Keys ordered by distance to i (ties: left first); take the closest that are not global columns.
        order = sorted(range(n), key=lambda j: (abs(j - i), j))
        near = [j for j in order if j not in g][: b - len(g)]
        out[i] = torch.tensor(sorted(g + near), dtype=torch.long)
    return out


def leverage_columns(basis: torch.Tensor, b: int) -> torch.Tensor:
    """The b keys with the largest leverage scores ||U_j||^2 in the (N, k) eigenbasis: (b,)."""
    n = basis.shape[0]
    _check(n, b)
    lev = (basis.double() ** 2).sum(1)
    return torch.argsort(lev, descending=True, stable=True)[:b].sort().values


def qr_columns(cov: torch.Tensor, b: int, rtol: float = 1e-10,
               eigen: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
    """Greedy keys by column-pivoted QR of (U Lambda^1/2)^T: each pick has the largest conditional variance
    given the earlier picks (equivalent to pivoted Cholesky of the covariance); (b,)."""
    n = cov.shape[0]
    _check(n, b)
    evals, evecs = eigen if eigen is not None else torch.linalg.eigh(cov.double())
    keep = evals > rtol * evals.max().clamp_min(1e-300)
    factor = (evecs[:, keep] * evals[keep].sqrt()).T.numpy()  # (r, N)
    _, _, piv = scipy_qr(factor, pivoting=True, mode="economic")
    piv = [int(p) for p in piv]
    if len(piv) < b:  # rank below b: append the remaining columns by variance
        rest = [int(j) for j in torch.argsort(torch.diagonal(cov), descending=True) if int(j) not in set(piv)]
        piv += rest
    return torch.tensor(sorted(piv[:b]), dtype=torch.long)


def topk_per_row(proxy: torch.Tensor, b: int, valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Top-b keys of each row of ``proxy`` (*, N, N); masked keys rank last: (*, N, b), sorted."""
    n = proxy.shape[-1]
    _check(n, b)
    p = proxy
    if valid is not None:
        p = p.masked_fill(~valid.expand_as(p), float("-inf"))
    return p.topk(b, dim=-1).indices.sort(-1).values


class Proxy:
    """Low-rank score proxy for one (layer, head): ``(q W_q)(k W_k)^T * scaling`` with W of shape (d_head, r)."""

    def __init__(self, wq: torch.Tensor, wk: torch.Tensor, kind: str):
        if wq.shape != wk.shape:
            raise ShapeError(f"proxy projections differ in shape: {tuple(wq.shape)} vs {tuple(wk.shape)}")
        self.wq, self.wk, self.kind = wq.float(), wk.float(), kind

    @property
    def rank(self) -> int:
        """r, the proxy dimension."""
        return self.wq.shape[1]

    def scores(self, q: torch.Tensor, k: torch.Tensor, scaling: float) -> torch.Tensor:
        """Proxy scores (..., Nq, Nk) from q (..., Nq, dh) and k (..., Nk, dh)."""
        wq, wk = self.wq.to(q.device), self.wk.to(k.device)
        return ((q.float() @ wq) @ (k.float() @ wk).transpose(-1, -2)) * scaling


def _sqrt_and_inv_sqrt(c: torch.Tensor, jitter: float) -> tuple[torch.Tensor, torch.Tensor]:
    evals, evecs = torch.linalg.eigh(c.double())
    evals = evals.clamp_min(0) + jitter * evals.clamp_min(0).mean().clamp_min(1e-12)
    return (evecs * evals.sqrt()) @ evecs.T, (evecs / evals.sqrt()) @ evecs.T


def make_proxy(kind: str, rank: int, d_head: int, cq: Optional[torch.Tensor] = None, ck: Optional[torch.Tensor] = None,
               seed: int = 0, jitter: float = 1e-6) -> Proxy:
    """Build a proxy: 'bilinear' (best rank-r approximation of q^T k under the fitted second moments),
    'pca' (shared top-r principal directions of q and k) or 'random' (Gaussian projection)."""
    if not 1 <= rank <= d_head:
        raise ConfigError(f"--proxy-rank must be in [1, d_head={d_head}] (got {rank})")
    if kind == "random":
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(d_head, rank, generator=g, dtype=torch.float64) / rank ** 0.5
        return Proxy(w, w, kind)
    if cq is None or ck is None:
        raise ConfigError(f"--proxy {kind} needs query/key moments from a corpus fit (a spectrum run has none); "
                          "use --proxy random or fit from a corpus")
    if kind == "pca":
        _, evecs = torch.linalg.eigh((cq + ck).double())
        w = evecs.flip(1)[:, :rank]
        return Proxy(w, w, kind)
    if kind == "bilinear":
        # E[(q^T (I - A) k)^2] = ||Cq^1/2 (I - A) Ck^1/2||_F^2 is minimised over rank-r A by truncating the SVD of
        # M = Cq^1/2 Ck^1/2 = U S V^T: A = Cq^-1/2 U_r S_r V_r^T Ck^-1/2, split as W_q W_k^T.
        sq, isq = _sqrt_and_inv_sqrt(cq, jitter)
        sk, isk = _sqrt_and_inv_sqrt(ck, jitter)
        u, s, vh = torch.linalg.svd(sq @ sk)
        root = s[:rank].sqrt()
        return Proxy(isq @ (u[:, :rank] * root), isk @ (vh[:rank].T * root), kind)
    raise ConfigError(f"--proxy must be bilinear, pca or random (got {kind!r})")


@SELECTIONS.register("random", help="b random keys per row", tags=("fixed",))
def _random(n, b, *, batch=1, generator=None, seed=0, **_):
    g = generator if generator is not None else torch.Generator().manual_seed(seed)
    return random_per_row((batch, n), n, b, g)


@SELECTIONS.register("fixed", help="b random columns, the same for every row", tags=("fixed", "static"))
def _fixed(n, b, *, seed=0, **_):
    return fixed_columns(n, b, seed)


@SELECTIONS.register("evenly", help="b evenly spaced columns", tags=("fixed", "static"))
def _evenly(n, b, **_):
    return evenly_spaced(n, b)


@SELECTIONS.register("local", help="a local window plus global columns", tags=("fixed", "static"))
def _local(n, b, *, global_cols=(0, -1), **_):
    return local_window(n, b, global_cols)


@SELECTIONS.register("leverage", help="columns of largest leverage in the fitted eigenbasis", tags=("fixed", "static"))
def _leverage(n, b, *, basis=None, **_):
    if basis is None:
        raise ConfigError("--selection leverage needs a fitted eigenbasis")
    return leverage_columns(basis, b)


@SELECTIONS.register("qr", help="pivoted-QR columns of the fitted covariance", tags=("fixed", "static"))
def _qr(n, b, *, cov=None, eigen=None, **_):
    if cov is None:
        raise ConfigError("--selection qr needs a fitted covariance")
    return qr_columns(cov, b, eigen=eigen)


@SELECTIONS.register("adaptive", help="per-row top-b of low-rank proxy scores", tags=("adaptive",))
def _adaptive(n, b, *, proxy_scores=None, valid=None, **_):
    if proxy_scores is None:
        raise ConfigError("--selection adaptive needs proxy scores (fitted query/key projections)")
    return topk_per_row(proxy_scores, b, valid)


@SELECTIONS.register("oracle", help="per-row top-b of the true scores (upper bound)", tags=("adaptive",))
def _oracle(n, b, *, scores=None, valid=None, **_):
    if scores is None:
        raise ConfigError("--selection oracle needs the true scores")
    return topk_per_row(scores, b, valid)


FIXED = tuple(SELECTIONS.names("fixed"))
ADAPTIVE = tuple(SELECTIONS.names("adaptive"))
STRATEGIES = tuple(SELECTIONS.names())


def select(strategy: str, n: int, b: int, *, batch: int = 1, cov: Optional[torch.Tensor] = None,
           basis: Optional[torch.Tensor] = None, proxy_scores: Optional[torch.Tensor] = None,
           scores: Optional[torch.Tensor] = None, valid: Optional[torch.Tensor] = None, seed: int = 0,
           generator: Optional[torch.Generator] = None, global_cols: tuple[int, ...] = (0, -1),
           eigen: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
    """Run the registered strategy ``strategy``; returns indices of shape (b,), (N, b) or (batch, N, b)."""
    return SELECTIONS.get(strategy)(n, b, batch=batch, cov=cov, basis=basis, proxy_scores=proxy_scores, scores=scores,
                                    valid=valid, seed=seed, generator=generator, global_cols=global_cols, eigen=eigen)
