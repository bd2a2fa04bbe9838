"""The oracle bound: exact tile mass (softmax over all keys, summed per tile), top-p per query block.

``oracle``: per query block, the fewest tiles whose exact mass reaches ``p`` (largest first) -- every
query block then keeps at least ``p`` of its rows' mean mass, so each head's recall over all rows is >= p.
``oracle-global``: per head, the fewest tiles over the whole head reaching ``p`` of its total mass
(mean recall exactly >= p with the fewest tiles of any block pattern: the true minimum density).
Both keep the diagonal tile (a row without keys would output zeros). The knob is ``p`` itself: no
calibration is needed. Its cost is one full q.k^T: a bound, not a method to deploy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor

from .registry import BLOCK_PREDICTORS
from .core import ScoredBlockMethod, exact_block_mass, mass_thresholds


@BLOCK_PREDICTORS.register("oracle", help="exact tile mass, fewest tiles reaching p per query block (bound)",
                           tags=("oracle",))
@dataclass
class OracleBlocks(ScoredBlockMethod):
    """Exact block mass with top-p per query block (``scope='row'``) or per head (``'head'``)."""

    calibrate: bool = False
    scope: str = "row"

    def prepare(self, q: Tensor, k: Tensor, causal: bool, block_size: int, scale: float) -> tuple[Any, float]:
        """Exact tile mass (B, H, nq, nk); cost = the full score matrix (causal: half)."""
        B, H, N, D = q.shape
        mass = exact_block_mass(q, k, block_size, causal, scale)
        return mass, float(B * H * N * k.shape[2] * D) * (0.5 if causal else 1.0)

    def thresholds(self, state: Any, causal: bool, block_size: int) -> Tensor:
        """Cumulative exact-mass thresholds (top-p tiles)."""
        return mass_thresholds(state, causal, 0, self.scope)


@BLOCK_PREDICTORS.register("oracle-global", help="exact tile mass, fewest tiles per head reaching mean recall p",
                           tags=("oracle",))
@dataclass
class OracleGlobalBlocks(OracleBlocks):
    """Per-head global top-p of the exact tile mass: the minimum-density pattern for mean recall p."""

    scope: str = "head"
