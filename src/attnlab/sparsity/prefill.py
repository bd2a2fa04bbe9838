"""Deprecated path: moved to :mod:`attnlab.blocksparse.prefill` (block-sparse execution has its own package)."""

from attnlab._lazy import moved_module

moved_module(__name__, "attnlab.blocksparse.prefill")
