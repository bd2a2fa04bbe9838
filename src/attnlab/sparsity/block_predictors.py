"""Deprecated path: moved to :mod:`attnlab.blocksparse.block_predictors` (block-sparse execution has its own package)."""

from attnlab._lazy import moved_module

moved_module(__name__, "attnlab.blocksparse.block_predictors")
