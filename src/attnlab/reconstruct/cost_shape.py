"""The sizes a per-row cost depends on (:class:`CostShape`) and the cost-function type (:data:`CostFn`).

Kept apart from :mod:`.cost` so that estimators (which carry their cost functions) and the cost accounting (which
reads them from the estimator registry) both import it without an import circle.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


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
