"""The predictor protocol and a small base class shared by all sparsity predictors.

A predictor guesses, from a layer's queries and keys, which (query, key) pairs entmax will attend to
(the gold graph), before attention is computed. Each one has an *operating-point knob* (threshold, k,
number of buckets / clusters, window): ``with_knob(value)`` returns a copy at another operating point,
``grid(n)`` lists the knob values a sweep visits (densest first; the first value predicts all pairs).

Costs (``cost(n, pairs)``) are predictor operations per head and sequence of length n in *pair-score units*:
one unit = one d_head-dimensional dot product (d_head multiply-adds); a scalar comparison or an
r-dimensional distance costs 1/d_head resp. r/d_head units. ``pairs`` is the number of candidate (valid)
pairs (n^2 bidirectional, n(n+1)/2 causal): pairwise work is done on those only. Selection is counted too
(a threshold test per candidate pair, top-k selection as ``pairs * log2(k)`` comparisons).
``compute_ops(q, k, valid)`` gives the Sparsefinder authors' operation count for their "computation sparsity"
(None = the predicted pairs). See :mod:`attnlab.sparsity.metrics`.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Optional, Protocol, runtime_checkable

import torch
from torch import Tensor

from ...errors import ConfigError
from ..graphs import check_qk, graph_from_ids, restrict


@runtime_checkable
class Predictor(Protocol):
    """What evaluation and FlexAttention execution need from a sparsity predictor (one per layer)."""

    name: str

    def fit(self, q: Tensor, k: Tensor, gold: Tensor, valid: Optional[Tensor]) -> "Predictor": ...

    def predict(self, q: Tensor, k: Tensor, valid: Optional[Tensor] = None) -> Tensor: ...

    def cost(self, n: int, pairs: Optional[float] = None) -> float: ...


@runtime_checkable
class BucketPredictor(Predictor, Protocol):
    """A predictor whose graph is 'query and key share a bucket / cluster id'."""

    def assign(self, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]: ...


class BasePredictor:
    """Common machinery: knob handling, valid-masking, d_head bookkeeping, config export."""

    name = "base"
    knob = ""  # attribute holding the operating point
    force_window = -1  # >= 0: always add edges with |i - j| <= force_window (Sparsefinder's forced window)
    force_cls = False  # always add edges to and from token 0 ([CLS])

    def __init__(self) -> None:
        self.d_head: Optional[int] = None
        self.fitted = False

    # -- protocol -------------------------------------------------------------------------------
    def fit(self, q: Tensor, k: Tensor, gold: Tensor, valid: Optional[Tensor] = None,
            shard: Any = None) -> "BasePredictor":
        """Learn from one layer's q, k (B, H, N, dh) and gold graph; returns self. Default: nothing to learn.

        ``shard`` (:class:`attnlab.distributed.WindowShard`): the windows are this rank's share of a torchrun run;
        learned predictors then fit data-parallel and every rank ends with the same state (None: all windows)."""
        check_qk(q, k)
        self.d_head = q.shape[-1]
        self.fitted = True
        return self

    def predict(self, q: Tensor, k: Tensor, valid: Optional[Tensor] = None) -> Tensor:
        """Predicted graph, bool (B, H, Nq, Nk), restricted to ``valid``."""
        check_qk(q, k)
        if self.d_head is None:
            self.d_head = q.shape[-1]
        g = self._predict(q, k, valid)
        if self.force_window >= 0:
            i = torch.arange(q.shape[2], device=g.device)[:, None]
            j = torch.arange(k.shape[2], device=g.device)[None, :]
            g = g | ((i - j).abs() <= self.force_window)
        if self.force_cls:
            g = g.clone()
            g[..., 0, :] = True
            g[..., :, 0] = True
        return restrict(g, valid)

    def _predict(self, q: Tensor, k: Tensor, valid: Optional[Tensor]) -> Tensor:
        if hasattr(self, "assign"):
            qi, ki = self.assign(q, k)  # type: ignore[attr-defined]
            return graph_from_ids(qi, ki)
        raise NotImplementedError

    def cost(self, n: int, pairs: Optional[float] = None) -> float:
        """Predictor operations per head for a sequence of length n (``pairs`` candidate pairs), pair-score units."""
        return 0.0

    def compute_ops(self, q: Tensor, k: Tensor, valid: Optional[Tensor] = None) -> Optional[Tensor]:
        """The authors' score computations per (sequence, head) (B, H), or None for 'the predicted pairs'.

        Bucket predictors (with ``assign``): per id slot, n_buckets x largest query bucket x largest key bucket
        (a batched kernel pads every bucket to the largest), plus n x forced-window width."""
        if not hasattr(self, "assign") or self.knob_value == self.all_pairs(q.shape[2]):
            return None
        with torch.no_grad():
            qi, ki = self.assign(q, k)  # type: ignore[attr-defined]
        B, H, N, S = qi.shape
        top = int(max(qi.max(), ki.max())) + 1
        ops = torch.zeros(B, H, dtype=torch.float64)
        for s in range(S):
            cq = torch.zeros(B, H, top).scatter_add_(-1, qi[..., s].long().cpu(), torch.ones(B, H, N))
            ck = torch.zeros(B, H, top).scatter_add_(-1, ki[..., s].long().cpu(), torch.ones(B, H, k.shape[2]))
            used = ((cq > 0) | (ck > 0)).sum(-1).double()
            ops += used * cq.amax(-1).double() * ck.amax(-1).double()
        if self.force_window >= 0:
            ops += N * (2 * self.force_window + 1)
        if self.force_cls:
            ops += 2 * N
        return ops

    # -- operating points -----------------------------------------------------------------------
    @property
    def knob_value(self) -> Any:
        """Current value of the operating-point knob."""
        return getattr(self, self.knob)

    def with_knob(self, value: Any) -> "BasePredictor":
        """A shallow copy at another operating point (learned parameters are shared, not copied)."""
        other = copy.copy(self)
        setattr(other, self.knob, value)
        other._check()
        return other

    def grid(self, n: int) -> list:
        """Knob values for a sweep at sequence length n, densest first (the first predicts all pairs)."""
        raise NotImplementedError

    def all_pairs(self, n: int) -> Any:
        """A knob value that predicts every valid pair (recall 1)."""
        return self.grid(n)[0]

    def _check(self) -> None:
        """Validate hyper-parameters (raise ConfigError naming the option)."""

    def _require_fit(self) -> None:
        if not self.fitted:
            raise ConfigError(f"predictor {self.name!r} must be fitted before predict (call .fit(q, k, gold, valid))")

    def config(self) -> dict:
        """JSON-friendly hyper-parameters."""
        return {k: v for k, v in vars(self).items()
                if isinstance(v, (int, float, str, bool, type(None))) and not k.startswith("_")}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.knob}={self.knob_value!r})"


def int_grid(n: int, values: list[int], full: Optional[int] = None) -> list[int]:
    """``values`` clipped to [.., n], deduplicated, preceded by ``full`` (default n)."""
    full = n if full is None else full
    out = [full]
    for v in values:
        if v < n and v not in out:
            out.append(v)
    return out


def select_cost(pairs: float, k: float, dh: int) -> float:
    """Top-k selection over ``pairs`` candidate scores: pairs * log2(max(k, 2)) comparisons, in pair-score units."""
    return pairs * math.log2(max(float(k), 2.0)) / dh


def topk_graph(scores: Tensor, k: int, valid: Optional[Tensor]) -> Tensor:
    """Graph of the k highest-scoring valid keys per query (ties broken by index)."""
    n = scores.shape[-1]
    k = max(0, min(int(k), n))
    if k >= n:
        return torch.ones_like(scores, dtype=torch.bool)
    s = scores
    if valid is not None:
        s = s.masked_fill(~valid.bool(), float("-inf"))
    g = torch.zeros_like(scores, dtype=torch.bool)
    if k == 0:
        return g
    idx = s.topk(k, dim=-1).indices
    return g.scatter_(-1, idx, True)
