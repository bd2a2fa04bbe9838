"""Total-compute accounting of reconstruction methods, in units of the dense QK^T multiply-adds of the same rows.

One score row (one query over ``n`` keys, head dimension ``d``) costs ``n * d`` multiply-adds densely; every
figure here is multiply-adds (MACs; a comparison, an add or a random draw counts as one) *per row*, and a
method's compute fraction is its total over ``n * d``. Counted per row:

- ``exact_pairs``: the b selected scores, ``b * d``;
- ``proxy_scores``: the rank-r proxy score of every pair, ``n * r`` (at the method's own rank);
- ``proxy_projections``: q W_q (``d * r``) and k W_k (``d * r`` per key, one key per row amortised): ``2 d r``;
- ``row_mean``: the exact row mean q . mean(k): the key mean amortised (``d``) plus the dot product (``d``);
- ``selection``: top-b of n proxy scores (linear-time selection: ``n``), b random draws, 0 for fixed columns;
- ``estimator``: the estimator's own arithmetic; with a selection shared by rows (fixed columns, or one set per
  query position) the gain matrices depend only on the fit and are computed once per head (``setup``, reported
  apart and not in the per-row total); with a selection per row (random, adaptive) every row pays its own
  factorisation (a Cholesky of the b x b observed covariance for the Gaussian estimator).

Not counted (the same for every method and for dense attention): the softmax over the row and the product with V.
``oracle`` needs every exact score to select, so it costs at least dense: it is an upper-bound reference only.
Each selection has one cost function registered by name in :data:`SELECTION_COSTS`; each estimator carries its
own (``cost``) in :data:`~attnlab.reconstruct.estimators.ESTIMATOR_REGISTRY`, next to itself.
"""

from __future__ import annotations

import warnings
from typing import Any, Optional

from ..errors import ConfigError
from ..registry import Registry
from .cost_shape import CostFn, CostShape
from .estimators import ESTIMATOR_REGISTRY, estimator_kind

SHARED_SELECTIONS = ("fixed", "evenly", "leverage", "qr", "local")  # gains precomputed per head (or per position)
ITEMS = ("exact_pairs", "proxy_scores", "proxy_projections", "row_mean", "selection", "estimator")


SELECTION_COSTS: Registry[CostFn] = Registry("selection cost", "--selections")


def _fixed(s: CostShape) -> dict[str, float]:
    return {"per_row": 0.0, "setup": 0.0}


for _name in ("fixed", "evenly", "local"):
    SELECTION_COSTS.add(_name, _fixed, help="input-independent columns: nothing per row")


@SELECTION_COSTS.register("leverage", help="leverage scores of the fitted basis, once per head")
def _leverage(s: CostShape) -> dict[str, float]:
    return {"per_row": 0.0, "setup": float(s.n * max(s.k, 1))}


@SELECTION_COSTS.register("qr", help="pivoted QR of the fitted covariance factor, once per head")
def _qr(s: CostShape) -> dict[str, float]:
    return {"per_row": 0.0, "setup": float(2 * s.n * s.n * s.b)}


@SELECTION_COSTS.register("random", help="b random draws per row")
def _random(s: CostShape) -> dict[str, float]:
    return {"per_row": float(s.b), "setup": 0.0}


@SELECTION_COSTS.register("adaptive", help="top-b of the n proxy scores (linear-time selection); proxy counted apart")
def _adaptive(s: CostShape) -> dict[str, float]:
    return {"per_row": float(s.n) if s.b < s.n else 0.0, "setup": 0.0}


@SELECTION_COSTS.register("oracle", help="every exact score (n d) plus top-b: a reference, never cheaper than dense")
def _oracle(s: CostShape) -> dict[str, float]:
    return {"per_row": float(s.n * s.d + s.n), "setup": 0.0}


@SELECTION_COSTS.register("none", help="no exact pairs (pure proxy)")
def _none_sel(s: CostShape) -> dict[str, float]:
    return {"per_row": 0.0, "setup": 0.0}


def cost_breakdown(estimator: str, selection: str, n: int, d: int, b: int, r: int = 0, k: float = 0,
                   offset: str = "exact") -> dict[str, Any]:
    """Per-row multiply-adds of every cost item, their fractions of dense (n d), the total fraction and setup.

    ``b = 0`` (selection 'none') is the pure proxy; ``r`` is the method's own proxy rank (0 if it uses none)."""
    if n < 1 or d < 1:
        raise ConfigError(f"cost needs n >= 1 keys and d >= 1 (got n={n}, d={d})")
    if not 0 <= b <= n:
        raise ConfigError(f"--budget {b} must be in [0, {n}] pairs per row")
    kind = estimator_kind(estimator)
    uses_proxy = selection == "adaptive" or kind.reads_proxy
    if uses_proxy and not 1 <= r <= d:
        raise ConfigError(f"--proxy-rank {r} must be in [1, d_head={d}] for {estimator}/{selection}")
    if not uses_proxy:
        r = 0
    if not kind.fills and b == 0:
        raise ConfigError(f"the {estimator!r} estimator with no exact pairs computes nothing")
    shape = CostShape(n, d, b, r, k, shared=selection in SHARED_SELECTIONS, offset_known=offset == "exact")
    sel = SELECTION_COSTS.get(selection)(shape)
    est = kind.cost(shape)
    needs_mean = offset == "exact" and kind.fills and b < n
    items = {
        "exact_pairs": float(0 if selection == "oracle" else b * d),  # the oracle's selection already has them
        "proxy_scores": float(n * r),
        "proxy_projections": float(2 * d * r),
        "row_mean": float(2 * d) if needs_mean else 0.0,
        "selection": sel["per_row"],
        "estimator": est["per_row"] if b < n else 0.0,
    }
    dense = float(n * d)
    total = sum(items.values())
    return {"per_row_macs": items, "fractions": {k_: v / dense for k_, v in items.items()}, "total_macs": total,
            "dense_macs": dense, "compute": total / dense, "pair_fraction": b / n, "setup_macs": sel["setup"] + est["setup"],
            "shared_gains": shape.shared, "proxy_rank": r or None, "reference_only": selection == "oracle"}


def check_compute(compute: Optional[float], flag: str = "--compute") -> None:
    """A total-compute budget must be a fraction in (0, 1] of dense."""
    if compute is None:
        return
    if isinstance(compute, bool) or not isinstance(compute, (int, float)) or not 0.0 < float(compute) <= 1.0:
        raise ConfigError(f"{flag} must be a fraction of the dense QK^T cost in (0, 1] (got {compute!r})")


def format_cost(c: dict[str, Any]) -> str:
    """One line: 'total 0.64 = pairs 0.25 + proxy 0.25 + proj 0.125 + mean 0.016 + select ... + est ...'."""
    f = c["fractions"]
    short = {"exact_pairs": "pairs", "proxy_scores": "proxy", "proxy_projections": "proj", "row_mean": "mean",
             "selection": "select", "estimator": "estim"}
    parts = [f"{short[k]} {f[k]:.3g}" for k in ITEMS if f[k] > 0]
    return f"total {c['compute']:.3g} = " + (" + ".join(parts) if parts else "0")


def method_cost(method: Any, d_head: Optional[int] = None) -> dict[str, Any]:
    """:func:`cost_breakdown` of an evaluated :class:`~attnlab.reconstruct.evaluate.Method` at its own proxy rank;
    the basis size is the method's ``k`` or, when chosen per head (min(k90, b)), its mean over the fitted heads."""
    fit, c = method.fit, method.combo
    d = int(d_head or fit.meta.get("d_head") or 0)
    if d < 1:
        raise ConfigError("cost accounting needs d_head (a corpus fit records it; this fit has none)")
    k = estimator_kind(c.estimator).cost_k(method)
    sel = "none" if method.b == 0 else c.selection
    return cost_breakdown(c.estimator, sel, fit.seq_len, d, method.b, method.proxy_rank, k, c.offset)


def __getattr__(name: str) -> Any:
    """``ESTIMATOR_COSTS`` (deprecated): a snapshot of every registered estimator's cost, read from the registry."""
    if name == "ESTIMATOR_COSTS":
        warnings.warn("attnlab.reconstruct.cost.ESTIMATOR_COSTS is deprecated: an estimator carries its cost, "
                      "ESTIMATOR_REGISTRY.get(name).cost", DeprecationWarning, stacklevel=2)
        snap: Registry[CostFn] = Registry("estimator cost", "--estimators")
        for n in ESTIMATOR_REGISTRY.names():
            e = ESTIMATOR_REGISTRY.entry(n)
            snap.add(n, e.obj.cost, e.help, tuple(e.tags))
        return snap
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
