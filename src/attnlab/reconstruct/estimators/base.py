"""The estimator protocol and its registry: one registered object per estimator, carrying its name, help, tags,
its compute cost per row and how it is built for one (layer, head) from a :class:`~..evaluate.Method`'s fit.

A new estimator is one file plus one registration (the evaluation, the cost accounting and the name checks of
``--estimators`` all read the registry)::

    class MedianFill(EstimatorKind):
        name, help = "median", "unselected keys get the median of the observed scores"

        def build(self, method, layer, head):  # the per-head object; anything with .estimate(...)
            return self

        def estimate(self, scores, idx, valid=None, row_mean=None, proxy=None): ...

        def cost(self, s):  # multiply-adds per row of the estimator's own arithmetic (and one-off setup per head)
            return {"per_row": float(s.b + s.u), "setup": 0.0}

    register_estimator(MedianFill())

Tags (:data:`TAGS`) say what an estimator needs; the shared code reads them instead of names.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Iterator, Optional, Protocol

import torch

from ...errors import ConfigError
from ...registry import Registry
from ..cost_shape import CostShape

TAGS = {
    "row-model": "built from the fitted row statistics: a kind of Estimator (Estimator(name, model, ...))",
    "proxy": "reads the low-rank proxy scores of every pair (the proxy rank is costed and shown in the label)",
    "basis": "needs a basis size k (--k, else min(k90 of the head, budget))",
    "residual": "needs the fitted statistics of the proxy's residual rows",
    "sparse": "fills nothing: unselected keys are masked out (no row mean; nothing to do without exact pairs)",
    "baseline": "a reference floor: not repeated at --extra-ranks (its adaptive rows are shown at --proxy-rank only)",
}


class HeadEstimator(Protocol):
    """An estimator built for one (layer, head)."""

    def estimate(self, scores: torch.Tensor, idx: torch.Tensor, valid: Optional[torch.Tensor] = None,
                 row_mean: Optional[torch.Tensor] = None, proxy: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Estimated scores (B, Nq, N) from the true ``scores`` (only entries at ``idx`` are read), the selection
        ``idx`` ((b,), (Nq, b) or (B, Nq, b)), allowed keys ``valid``, the exact row means ``row_mean`` (B, Nq) or
        None, and the proxy scores ``proxy`` (B, Nq, N) of every pair (given only to estimators tagged ``proxy``)."""
        ...


class EstimatorKind:
    """A registered estimator: name, help, tags, cost per row, and how it is built per (layer, head)."""

    name: str = ""
    help: str = ""
    tags: tuple[str, ...] = ()

    @property
    def reads_proxy(self) -> bool:
        """Reads the proxy scores of every pair."""
        return "proxy" in self.tags

    @property
    def needs_k(self) -> bool:
        """Needs a basis size k."""
        return "basis" in self.tags

    @property
    def needs_residual(self) -> bool:
        """Needs the fitted residual statistics of the proxy."""
        return "residual" in self.tags

    @property
    def rank_sweep(self) -> bool:
        """Its adaptive-selection rows are also evaluated at every --extra-ranks (False for baselines)."""
        return "baseline" not in self.tags

    @property
    def fills(self) -> bool:
        """Estimates the unselected scores (False: they are masked out)."""
        return "sparse" not in self.tags

    def build(self, method: Any, layer: int, head: int) -> HeadEstimator:
        """The estimator of (layer, head) for ``method`` (its fit, combo, k, ridge, jitter, proxy, dtype, ...)."""
        raise NotImplementedError

    def cost(self, s: CostShape) -> dict[str, float]:
        """Multiply-adds of the estimator's own arithmetic: {"per_row": ..., "setup": once per head}."""
        raise NotImplementedError

    def validate(self, combo: Any) -> None:
        """Raise ConfigError when this estimator cannot run ``combo`` (a statistics variant it lacks)."""

    def check(self, fit: Any, b: int, kw: dict[str, Any]) -> None:
        """Raise ConfigError before any evaluation when ``fit`` at ``b`` pairs with Method settings ``kw`` cannot work."""

    def cost_k(self, method: Any) -> float:
        """The basis size the cost of ``method`` counts (0: no basis)."""
        return 0.0


#: name -> :class:`EstimatorKind` (``--estimators`` selects them); tags as in :data:`TAGS`.
ESTIMATOR_REGISTRY: Registry[EstimatorKind] = Registry("estimator", "--estimators")


def register_estimator(kind: Any) -> Any:
    """Register an :class:`EstimatorKind` instance (or, as a class decorator, an instance of the class)."""
    obj = kind() if isinstance(kind, type) else kind
    if not obj.name:
        raise ValueError(f"estimator {type(obj).__name__} has no name")
    unknown = sorted(set(obj.tags) - set(TAGS))
    if unknown:
        raise ValueError(f"estimator {obj.name!r}: unknown tags {unknown} (known: {', '.join(TAGS)})")
    ESTIMATOR_REGISTRY.add(obj.name, obj, obj.help, tuple(obj.tags))
    return kind


def estimator_kind(name: str) -> EstimatorKind:
    """The registered estimator ``name``; an unknown name is a ConfigError naming --estimators and the choices."""
    if name not in ESTIMATOR_REGISTRY:
        raise ConfigError(f"--estimators: unknown {name!r} (choose from {', '.join(ESTIMATOR_REGISTRY.names())})")
    return ESTIMATOR_REGISTRY.get(name)


def make_estimator(name: str, method: Any, layer: int, head: int) -> HeadEstimator:
    """Build the registered estimator ``name`` for (layer, head) of ``method``."""
    return estimator_kind(name).build(method, layer, head)


class NameView(Sequence):
    """The registered estimator names (optionally those with one tag), read live from the registry."""

    def __init__(self, tag: Optional[str] = None):
        self.tag = tag

    def _names(self) -> tuple[str, ...]:
        return tuple(ESTIMATOR_REGISTRY.names(self.tag))

    def __getitem__(self, i: Any) -> Any:
        return self._names()[i]

    def __len__(self) -> int:
        return len(self._names())

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())

    def __contains__(self, name: object) -> bool:
        return name in self._names()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, (tuple, list, NameView)) and tuple(self) == tuple(other)

    def __repr__(self) -> str:
        return repr(self._names())
