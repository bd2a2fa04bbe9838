"""Fit m*(T) against a + b log T and a + b T^c and say which law the data prefer (by AICc)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

import numpy as np

from ..errors import ConfigError

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

    def predict(self, T: np.ndarray | Sequence[float]) -> np.ndarray:
        """Evaluate the fitted law."""
        return LAWS[self.law](np.asarray(T, dtype=float), **self.params)


@dataclass
class FitReport:
    """Both fits and the winner (lower AICc)."""

    log: LawFit
    power: LawFit
    best: str
    delta_aic: float  # AICc(loser) - AICc(winner) >= 0
    n_points: int

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


def fit_laws(T: Sequence[float], m: Sequence[float]) -> FitReport:
    """Least-squares fits (scipy curve_fit) of m against a + b log T and a + b T^c; winner by AICc."""
    from scipy.optimize import curve_fit

    T_arr, y = np.asarray(T, dtype=float), np.asarray(m, dtype=float)
    if T_arr.shape != y.shape or T_arr.ndim != 1:
        raise ConfigError(f"T and m* must be 1-D of the same length (got {T_arr.shape} and {y.shape})")
    keep = np.isfinite(y) & np.isfinite(T_arr)
    T_arr, y = T_arr[keep], y[keep]
    if np.any(T_arr <= 0):
        raise ConfigError("--T values must be > 0 to fit log T and T^c")
    if len(T_arr) < MIN_POINTS or len(np.unique(T_arr)) < MIN_POINTS:
        raise ConfigError(
            f"--T: fitting m*(T) needs at least {MIN_POINTS} distinct context lengths with a reached m*, "
            f"got {len(np.unique(T_arr))}; add more --T values or raise --m-max"
        )
    (a, b), _ = curve_fit(log_law, T_arr, y)
    log_fit = _score("log", {"a": float(a), "b": float(b)}, T_arr, y)
    # The power law is fitted in the Box-Cox form a' + b' (T^c - 1) / c, which tends to the log law as
    # c -> 0 (so near-log data do not send the optimiser off to b -> inf), then mapped back to a + b T^c.
    best_power = None
    logT = np.log(T_arr)
    for c0 in (0.5, 0.05, 1.5):  # a few starts: the fit is non-convex in c
        try:
            p, _ = curve_fit(_box_cox, logT, y, p0=(float(y.min()), float(np.ptp(y)) or 1.0, c0),
                             bounds=([-np.inf, -np.inf, -3.0], [np.inf, np.inf, 3.0]), maxfev=5000)
        except (RuntimeError, ValueError):
            continue
        a_bc, b_bc, c = (float(v) for v in p)
        c = c if abs(c) >= 1e-9 else math.copysign(1e-9, c or 1.0)
        cand = _score("power", {"a": a_bc - b_bc / c, "b": b_bc / c, "c": c}, T_arr, y,
                      pred=_box_cox(logT, a_bc, b_bc, c))
        if best_power is None or cand.sse < best_power.sse:
            best_power = cand
    if best_power is None:
        raise ConfigError("the power-law fit a + b T^c did not converge for these points")
    best = "log" if log_fit.aic <= best_power.aic else "power"
    delta = abs(best_power.aic - log_fit.aic)
    return FitReport(log=log_fit, power=best_power, best=best, delta_aic=delta, n_points=len(T_arr))
