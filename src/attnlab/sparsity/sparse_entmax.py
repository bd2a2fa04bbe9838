"""Deprecated path: moved to :mod:`attnlab.blocksparse.sparse_entmax` (block-sparse execution has its own package)."""

from attnlab._lazy import moved_module

moved_module(__name__, "attnlab.blocksparse.sparse_entmax")
