"""The one registry of block predictors (each predictor module registers itself here)."""

from __future__ import annotations

from attnlab.registry import Registry

#: name -> block predictor class (``BLOCK_PREDICTORS.get(name)(**options).predict(q, k, p=...)``); use
#: :func:`attnlab.blocksparse.predictors.make_block_predictor`, which imports every built-in first.
BLOCK_PREDICTORS: Registry = Registry("block predictor", "--block-predictor")
