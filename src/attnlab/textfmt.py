"""Numbers as a person reads them in CLI output: rounded, intervals only where there is a spread."""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

__all__ = ["NO_INTERVAL", "interval", "num", "spread"]

NO_INTERVAL = "one seed: no interval"


def num(x: Any, digits: int = 3) -> str:
    """``x`` to ``digits`` significant digits (integers as they are; None -> 'n/a'; infinities by name)."""
    if x is None:
        return "n/a"
    if isinstance(x, bool) or isinstance(x, int):
        return str(x)
    try:
        v = float(x)
    except (TypeError, ValueError):
        return str(x)
    if math.isnan(v):
        return "nan"
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    if v == int(v) and abs(v) < 10 ** digits:
        return str(int(v))
    return f"{v:.{digits}g}"


def interval(ci: Optional[Sequence[Any]], n: Optional[int] = None, digits: int = 3) -> str:
    """'[lo, hi]' rounded; :data:`NO_INTERVAL` for a single seed (``n == 1``) or a degenerate interval, and
    infinite ends named as such: '[-0.74, unbounded)', not [-0.735, inf] (both: 'unbounded (...)')."""
    if ci is None or len(ci) != 2 or n == 1:
        return NO_INTERVAL
    lo, hi = ci
    if lo is None or hi is None:
        return NO_INTERVAL
    if n is None and float(lo) == float(hi):
        return NO_INTERVAL
    if math.isinf(float(lo)) and math.isinf(float(hi)):
        return "unbounded (the data do not pin it down)"
    left = "(unbounded" if math.isinf(float(lo)) else f"[{num(lo, digits)}"
    right = "unbounded)" if math.isinf(float(hi)) else f"{num(hi, digits)}]"
    return f"{left}, {right}"


def spread(mean: float, sd: float, n: int, digits: int = 4) -> str:
    """'mean ± sd' over ``n`` seeds; just the mean and :data:`NO_INTERVAL` when ``n == 1``."""
    if n <= 1:
        return f"{mean:.{digits}f} ({NO_INTERVAL})"
    return f"{mean:.{digits}f} ± {sd:.{digits}f}"
