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
Each selection and estimator has one cost function, registered by name in :data:`SELECTION_COSTS` and
:data:`ESTIMATOR_COSTS` (a new method registers its cost next to itself).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

from ..errors import ConfigError
from ..registry import Registry

SHARED_SELECTIONS = ("fixed", "evenly", "leverage", "qr", "local")  # gains precomputed per head (or per position)
ITEMS = ("exact_pairs", "proxy_scores", "proxy_projections", "row_mean", "selection", "estimator")


@dataclass(frozen=True)
class CostShape:
    """The sizes a cost depends on: keys per row n, head dim d, exact pairs b, proxy rank r, basis size k."""

    n: int
    d: int
    b: int
    r: int = 0
    k: float = 0  # basis size (may be a mean over heads)
    shared: bool = False  # the selection is the same for every row of a head (or of a query position)
    offset_known: bool = True  # the exact row mean is computed (offset known); else estimated from observed pairs

    @property
    def u(self) -> int:
        """Unobserved pairs per row."""
        return self.n - self.b


CostFn = Callable[[CostShape], dict[str, float]]  # -> {"per_row": MACs, "setup": one-off MACs per head}
SELECTION_COSTS: Registry[CostFn] = Registry("selection cost", "--selections")
ESTIMATOR_COSTS: Registry[CostFn] = Registry("estimator cost", "--estimators")


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


@ESTIMATOR_COSTS.register("none", help="sparse attention on the selected pairs: no estimate")
def _none(s: CostShape) -> dict[str, float]:
    return {"per_row": 0.0, "setup": 0.0}


@ESTIMATOR_COSTS.register("mean", help="fill with the fitted mean shifted to the row")
def _mean(s: CostShape) -> dict[str, float]:
    return {"per_row": float(s.u + (0 if s.offset_known else s.b)), "setup": 0.0}


@ESTIMATOR_COSTS.register("proxy", help="fill with the proxy scores, shifted to the row's mean")
def _proxy(s: CostShape) -> dict[str, float]:
    # shift: sums of the proxy over unobserved and of the exact observed scores (n), then u adds
    return {"per_row": float(s.n + s.u), "setup": 0.0}


def _gaussian_core(s: CostShape) -> dict[str, float]:
    b, u, n = s.b, s.u, s.n
    rhs = 1 if s.offset_known else 2  # residual (and the all-ones vector for the GLS offset)
    if s.shared:  # est_R = mu_R + m + (r - m) G with G = A^-1 Sigma_SR fixed per head (or per position)
        per_row = b * u + u + (0 if s.offset_known else b)
        setup = b ** 3 / 6 + b * b * n + (b * b if not s.offset_known else 0)
        return {"per_row": float(per_row), "setup": float(setup)}
    # per row: Cholesky of the b x b observed covariance, two triangular solves per right-hand side,
    # the product Sigma_RS w over the unobserved keys, plus the fill
    per_row = b ** 3 / 6 + rhs * b * b + b * u + u + (0 if s.offset_known else 2 * b)
    return {"per_row": float(per_row), "setup": 0.0}


@ESTIMATOR_COSTS.register("gaussian", help="conditional Gaussian (kriging); shared or per-row gains")
def _gaussian(s: CostShape) -> dict[str, float]:
    return _gaussian_core(s)


@ESTIMATOR_COSTS.register("proxy+gaussian", help="proxy plus the conditional-Gaussian estimate of its residual")
def _proxy_gaussian(s: CostShape) -> dict[str, float]:
    g = _gaussian_core(s)
    return {"per_row": g["per_row"] + s.b + s.u, "setup": g["setup"]}  # e_S = s_S - p_S; p_R + e_R


@ESTIMATOR_COSTS.register("basis", help="ridge least squares in the top-k eigenbasis")
def _basis(s: CostShape) -> dict[str, float]:
    k1, b, n = s.k + 1, s.b, s.n
    if s.shared:  # coefficients = P r with P the (k+1) x b ridge pseudo-inverse (once per head), then U_R a
        return {"per_row": float(k1 * b + k1 * s.u), "setup": float(b * k1 * k1 + k1 ** 3 / 3 + k1 * k1 * b)}
    # per row: Gram Phi_S^T Phi_S, right-hand side, LU solve, reconstruction over the unobserved keys
    return {"per_row": float(b * k1 * k1 + b * k1 + k1 ** 3 / 3 + k1 * s.u), "setup": 0.0}


def cost_breakdown(estimator: str, selection: str, n: int, d: int, b: int, r: int = 0, k: float = 0,
                   offset: str = "exact") -> dict[str, Any]:
    """Per-row multiply-adds of every cost item, their fractions of dense (n d), the total fraction and setup.

    ``b = 0`` (selection 'none') is the pure proxy; ``r`` is the method's own proxy rank (0 if it uses none)."""
    if n < 1 or d < 1:
        raise ConfigError(f"cost needs n >= 1 keys and d >= 1 (got n={n}, d={d})")
    if not 0 <= b <= n:
        raise ConfigError(f"--budget {b} must be in [0, {n}] pairs per row")
    uses_proxy = selection == "adaptive" or estimator in ("proxy", "proxy+gaussian")
    if uses_proxy and not 1 <= r <= d:
        raise ConfigError(f"--proxy-rank {r} must be in [1, d_head={d}] for {estimator}/{selection}")
    if not uses_proxy:
        r = 0
    if estimator == "none" and b == 0:
        raise ConfigError("the 'none' estimator with no exact pairs computes nothing")
    shape = CostShape(n, d, b, r, k, shared=selection in SHARED_SELECTIONS, offset_known=offset == "exact")
    sel = SELECTION_COSTS.get(selection)(shape)
    est = ESTIMATOR_COSTS.get(estimator)(shape)
    needs_mean = offset == "exact" and estimator != "none" and b < n
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
    k = 0.0
    if c.estimator == "basis":
        if method.k is not None:
            k = float(method.k)
        else:
            ks = [min(fit.rank_for(l, h, 0.9, c.position, c.pool_heads), method.b) for l in fit.layers for h in fit.heads]
            k = sum(ks) / len(ks)
    sel = "none" if method.b == 0 else c.selection
    return cost_breakdown(c.estimator, sel, fit.seq_len, d, method.b, method.proxy_rank, k, c.offset)
