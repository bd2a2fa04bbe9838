"""Deprecated: ``ours`` was split into :mod:`.pooled` (``PooledBlocks`` is now ``PooledMassPredictor``) and
:mod:`.cluster`."""

import warnings

from .cluster import ClusterBlocks  # noqa: F401
from .pooled import PooledMassPredictor

warnings.warn("attnlab.blocksparse.predictors.ours moved to .pooled / .cluster; PooledBlocks is now "
              "PooledMassPredictor", DeprecationWarning, stacklevel=2)

PooledBlocks = PooledMassPredictor
