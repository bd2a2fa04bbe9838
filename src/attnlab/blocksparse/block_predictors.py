"""Deprecated module: the block predictors moved, one file each, to :mod:`attnlab.blocksparse.predictors`
(``pooled.py``: ``PooledBudgetPredictor``, formerly ``PooledBlockPredictor``; ``cluster.py``:
``ClusterBlockPredictor``) and :mod:`attnlab.blocksparse.adapter` (``AssignBlockPredictor``)."""

import warnings

from attnlab.blocksparse.adapter import AssignBlockPredictor  # noqa: F401
from attnlab.blocksparse.predictors.cluster import ClusterBlockPredictor  # noqa: F401
from attnlab.blocksparse.predictors.core import BlockPredictor  # noqa: F401
from attnlab.blocksparse.predictors.pooled import (  # noqa: F401
    PooledBudgetPredictor,
    budget_blocks,
    lowrank_projections,
)

warnings.warn("attnlab.blocksparse.block_predictors moved to attnlab.blocksparse.predictors (pooled, cluster) and "
              "attnlab.blocksparse.adapter; PooledBlockPredictor is now PooledBudgetPredictor",
              DeprecationWarning, stacklevel=2)

PooledBlockPredictor = PooledBudgetPredictor

__all__ = ["AssignBlockPredictor", "BlockPredictor", "ClusterBlockPredictor", "PooledBlockPredictor",
           "PooledBudgetPredictor", "budget_blocks", "lowrank_projections"]
