"""The block-mask overlay of the report's attention views: the tiles ``sparse_attention``'s default kind of
predictor (:class:`~attnlab.blocksparse.predictors.pooled.PooledBudgetPredictor`) keeps for a window
(registered by name in :data:`attnlab.report.views.VIEW_OVERLAYS`)."""

from __future__ import annotations

from torch import Tensor

from attnlab.blocksparse.flex import resolve_pattern
from attnlab.blocksparse.predictors.pooled import PooledBudgetPredictor

__all__ = ["PredictedBlocks", "PREDICTED_BLOCKS"]


class PredictedBlocks:
    """(q, k) (1, H, N, D) of one window -> the (H, nb, nb) block graph the pooled budget predictor keeps
    (sub-blocks of a quarter tile)."""

    def __call__(self, q: Tensor, k: Tensor, block_size: int, budget: float) -> Tensor:
        """The kept-tile graph of batch row 0."""
        pred = PooledBudgetPredictor(budget=budget, pool=_pool(block_size))
        return resolve_pattern(q, k, pred, block_size=block_size).block_graph()[0]

    def describe(self, block_size: int, budget: float) -> str:
        """What the overlay shows (saved in the views' metadata)."""
        # the class's former name, kept so that saved views metadata stays byte-identical
        return f"PooledBlockPredictor(budget={budget}, pool={_pool(block_size)}) (sparse_attention's default kind)"


PREDICTED_BLOCKS = PredictedBlocks()


def _pool(block_size: int) -> int:
    """Sub-block size for the overlay: a quarter tile when it divides the tile, else 1 token."""
    p = max(1, block_size // 4)
    return p if block_size % p == 0 else 1
