"""Fit m*(T) against a + b log T and a + b T^c, with confidence intervals, and declare a law only when supported.

Intervals come from a bootstrap over seeds (resample each T's per-seed m*, refit the medians) when the
per-seed values are given, else from the least-squares covariance (t quantiles). The power law is fitted
in the Box-Cox form a + b (T^c - 1) / c, which is exactly the log law at c = 0, so a log law is what a
power law with c near 0 mimics. Verdict:
- ``power``: the interval of c excludes 0 from above (growth faster than any log law);
- ``log``: the interval of c lies below ``c_poly`` (no polynomial growth of at least T^c_poly is
  supported) and the log slope b is positive (its interval excludes 0);
- ``inconclusive`` otherwise (the reason is given). AICc is reported but decides nothing.
"""


from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional, Sequence

import numpy as np

from ..errors import ConfigError
from ..textfmt import interval

MIN_POINTS = 5  # AICc of the 3-parameter power law needs n - k - 1 > 0


def log_law(T: np.ndarray, a: float, b: float) -> np.ndarray:
    """a + b log T."""
    return a + b * np.log(T)


def power_law(T: np.ndarray, a: float, b: float, c: float) -> np.ndarray:
    """a + b T^c."""
    return a + b * np.power(T, c)


LAWS: dict[str, Callable[..., np.ndarray]] = {"log": log_law, "power": power_law}


@dataclass
class LawFit:
    """One fitted law."""

    law: str
    params: dict[str, float]
    sse: float  # sum of squared residuals
    r2: float  # coefficient of determination
    aic: float  # AICc = n log(SSE / n) + 2k + 2k(k + 1) / (n - k - 1) (Gaussian residuals, small-sample corrected)
    ci: dict[str, list[float]] = field(default_factory=dict)  # confidence interval per parameter (and r2)

    def predict(self, T: np.ndarray | Sequence[float]) -> np.ndarray:
        """Evaluate the fitted law."""
        return LAWS[self.law](np.asarray(T, dtype=float), **self.params)


@dataclass
class FitReport:
    """Both fits, the AICc winner (information only) and the verdict (see module docstring)."""

    log: LawFit
    power: LawFit
    best: str
    delta_aic: float  # AICc(loser) - AICc(winner) >= 0
    n_points: int
    verdict: str = "inconclusive"  # log | power | inconclusive
    reason: str = ""
    level: float = 0.95
    method: str = "t"  # bootstrap (over seeds) | t (least-squares covariance)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict."""
        return asdict(self)


def _box_cox(logT: np.ndarray, a: float, b: float, c: float) -> np.ndarray:
    """a + b (T^c - 1) / c as a function of log T (exactly a + b log T at c = 0)."""
    small = np.abs(c) < 1e-12
    return a + b * np.where(small, logT, np.expm1(c * logT) / (c if not small else 1.0))


def _score(law: str, params: dict[str, float], T: np.ndarray, y: np.ndarray,
           pred: np.ndarray | None = None) -> LawFit:
    """Residual statistics of one fitted law."""
    pred = LAWS[law](T, **params) if pred is None else pred
    sse = float(np.sum((y - pred) ** 2))
    sst = float(np.sum((y - y.mean()) ** 2))
    n, k = len(y), len(params)
    floor = 1e-12 * max(sst, float(np.sum(y**2)), 1e-300)  # an exact fit would give AIC = -inf
    aic = n * math.log(max(sse, floor) / n) + 2 * k + 2 * k * (k + 1) / (n - k - 1)
    return LawFit(law, params, sse, 1.0 - sse / sst if sst > 0 else float("nan"), aic)


def _fit_log(T: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """OLS of y on log T: (params [a, b], covariance)."""
    X = np.column_stack([np.ones_like(T), np.log(T)])
    beta, *_ = np.linalg.lstsq(X, y, rcond=None)
    dof = max(len(y) - 2, 1)
    s2 = float(np.sum((y - X @ beta) ** 2)) / dof
    return beta, s2 * np.linalg.pinv(X.T @ X)


C_GRID = np.linspace(-2.0, 2.0, 801)  # exponents searched by the power-law fit (step 0.005)


def _profile(T: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each c of C_GRID, the least-squares (a', b') of y ~ a' + b' (T^c - 1) / c: params (C, 2), SSE (C,)."""
    logT = np.log(T)
    c = C_GRID[:, None]
    small = np.abs(c) < 1e-12
    G = np.where(small, logT[None], np.expm1(c * logT[None]) / np.where(small, 1.0, c))  # (C, n)
    gm, ym = G.mean(1, keepdims=True), y.mean()
    sgg = ((G - gm) ** 2).sum(1)
    sgy = ((G - gm) * (y - ym)[None]).sum(1)
    b = np.where(sgg > 0, sgy / np.where(sgg > 0, sgg, 1.0), 0.0)
    a = ym - b * gm[:, 0]
    sse = (((y - ym) ** 2).sum() - b * sgy).clip(min=0.0)
    return np.column_stack([a, b]), sse


def _fit_power(T: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Box-Cox fit by profiling c over C_GRID: (a', b', c) and the SSE profile over the grid."""
    ab, sse = _profile(T, y)
    i = int(np.argmin(sse))
    return np.array([ab[i, 0], ab[i, 1], C_GRID[i]]), sse


def _r2(y: np.ndarray, pred: np.ndarray) -> float:
    """Coefficient of determination."""
    sst = float(np.sum((y - y.mean()) ** 2))
    return 1.0 - float(np.sum((y - pred) ** 2)) / sst if sst > 0 else float("nan")


def _boot_medians(per_seed: Sequence[Sequence[Optional[float]]], rng: np.random.Generator) -> np.ndarray:
    """One bootstrap resample: per T, the median of the per-seed values resampled with replacement."""
    out = []
    for vals in per_seed:
        v = np.array([math.inf if x is None else float(x) for x in vals])
        out.append(float(np.median(v[rng.integers(0, len(v), len(v))])))
    return np.array(out)


def fit_laws(T: Sequence[float], m: Sequence[float], per_seed: Optional[Sequence[Sequence[Optional[float]]]] = None,
             n_boot: int = 1000, level: float = 0.95, c_poly: float = 0.25, seed: int = 0) -> FitReport:
    """Fit m against a + b log T and a + b T^c with CIs and a verdict (module docstring).

    ``per_seed[i]`` holds the per-seed m* at ``T[i]`` (None = not learned); with it (and >= 3 seeds at
    every T), CIs come from a bootstrap over seeds, else from the least-squares fit (t / profile F).
    """
    from scipy import stats

    T_arr, y = np.asarray(T, dtype=float), np.asarray(m, dtype=float)
    if T_arr.shape != y.shape or T_arr.ndim != 1:
        raise ConfigError(f"T and m* must be 1-D of the same length (got {T_arr.shape} and {y.shape})")
    if per_seed is not None and len(per_seed) != len(T_arr):
        raise ConfigError(f"per_seed must have one list per T (got {len(per_seed)} for {len(T_arr)} T values)")
    keep = np.isfinite(y) & np.isfinite(T_arr)
    T_arr, y = T_arr[keep], y[keep]
    per_seed = [p for p, k in zip(per_seed, keep) if k] if per_seed is not None else None
    if np.any(T_arr <= 0):
        raise ConfigError("--T values must be > 0 to fit log T and T^c")
    if len(T_arr) < MIN_POINTS or len(np.unique(T_arr)) < MIN_POINTS:
        raise ConfigError(
            f"--T: fitting m*(T) needs at least {MIN_POINTS} distinct context lengths with a reached m*, "
            f"got {len(np.unique(T_arr))}; add more --T values or raise --m-max"
        )
    if not 0 < level < 1:
        raise ConfigError(f"--level must be in (0, 1) (got {level})")
    (a, b), cov_log = _fit_log(T_arr, y)
    log_fit = _score("log", {"a": float(a), "b": float(b)}, T_arr, y)
    pw, sse_profile = _fit_power(T_arr, y)
    a_bc, b_bc, c = (float(v) for v in pw)
    c = c if abs(c) >= 1e-9 else math.copysign(1e-9, c or 1.0)
    logT = np.log(T_arr)
    power_fit = _score("power", {"a": a_bc - b_bc / c, "b": b_bc / c, "c": c}, T_arr, y,
                       pred=_box_cox(logT, a_bc, b_bc, c))
    alpha = (1 - level) / 2
    if per_seed is not None and n_boot > 0 and min(len(p) for p in per_seed) >= 3:  # fewer seeds: t intervals
        method = "bootstrap"
        rng = np.random.default_rng(seed)
        bs: dict[str, list[float]] = {"a": [], "b": [], "c": [], "r2": []}
        for _ in range(n_boot):
            yb = _boot_medians(per_seed, rng)
            ok = np.isfinite(yb)
            if ok.sum() < MIN_POINTS:
                continue
            (ab, bb), _ = _fit_log(T_arr[ok], yb[ok])
            bs["a"].append(ab), bs["b"].append(bb)
            bs["r2"].append(_r2(yb[ok], ab + bb * logT[ok]))
            bs["c"].append(float(_fit_power(T_arr[ok], yb[ok])[0][2]))
        q = lambda v: [float(np.quantile(v, alpha)), float(np.quantile(v, 1 - alpha))] if v else [-math.inf, math.inf]  # noqa: E731
        log_fit.ci = {"a": q(bs["a"]), "b": q(bs["b"]), "r2": q([r for r in bs["r2"] if math.isfinite(r)])}
        cq = q(bs["c"])  # an end at the edge of the searched exponents is unbounded
        power_fit.ci = {"c": [-math.inf if cq[0] <= C_GRID[0] else cq[0], math.inf if cq[1] >= C_GRID[-1] else cq[1]]}
    else:
        method = "t"
        n = len(y)
        t2 = stats.t.ppf(1 - alpha, max(n - 2, 1))
        se = np.sqrt(np.clip(np.diag(cov_log), 0, None))
        log_fit.ci = {"a": [float(a - t2 * se[0]), float(a + t2 * se[0])],
                      "b": [float(b - t2 * se[1]), float(b + t2 * se[1])]}
        # profile-likelihood interval: every c whose best SSE passes the F test against the minimum
        dof = max(n - 3, 1)
        smin = float(sse_profile.min())
        fcrit = stats.f.ppf(level, 1, dof)
        inside = C_GRID[(sse_profile - smin) <= fcrit * max(smin, 1e-300) / dof]
        lo_c = -math.inf if inside.min() <= C_GRID[0] else float(inside.min())
        hi_c = math.inf if inside.max() >= C_GRID[-1] else float(inside.max())
        power_fit.ci = {"c": [lo_c, hi_c]}
    best = "log" if log_fit.aic <= power_fit.aic else "power"
    delta = abs(power_fit.aic - log_fit.aic)
    verdict, reason = _verdict(log_fit, power_fit, c_poly, level)
    return FitReport(log=log_fit, power=power_fit, best=best, delta_aic=delta, n_points=len(T_arr),
                     verdict=verdict, reason=reason, level=level, method=method)


def _verdict(log_fit: LawFit, power_fit: LawFit, c_poly: float, level: float) -> tuple[str, str]:
    """log | power | inconclusive, with the reason in words."""
    c_lo, c_hi = power_fit.ci["c"]
    b_lo = log_fit.ci["b"][0]
    pct = f"{100 * level:g}%"
    ivl = interval([c_lo, c_hi])
    cs = f"exponent c in {ivl} ({pct})" if ivl[0] in "[(" else f"exponent c: {ivl}"
    if c_lo > 0:
        return "power", f"{cs} excludes 0: grows faster than any log law"
    if c_hi < c_poly and b_lo > 0:
        return "log", f"{cs} stays below {c_poly:g} and the log slope b > 0 (lower end {b_lo:.3g})"
    if c_hi >= c_poly:
        return "inconclusive", f"{cs} contains both 0 (log) and {c_poly:g} (polynomial)"
    return "inconclusive", f"log slope b's interval reaches {b_lo:.3g} <= 0: no clear growth with T"
