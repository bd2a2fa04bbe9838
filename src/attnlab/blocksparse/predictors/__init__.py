"""Block predictors for long-context prefill, behind one interface and one registry.

Every entry of :data:`BLOCK_PREDICTORS` is a dataclass whose instances have
``predict(q, k, causal=True, block_size=128, p=0.95, scale=None) -> BlockPrediction``: q (B, H, N, D),
k (B, Hk, N, D) (grouped-query heads are expanded), a mean mass-recall target ``p`` per head; the result
holds a :class:`~attnlab.blocksparse.blockmask.BlockPattern` whose kv lists keep FULL tiles (no mask_mod)
apart from PARTIAL ones (the causal diagonal), the multiply-adds the prediction cost, and the per-head knob.

Methods (one file each): ``oracle`` / ``oracle-global`` (exact block mass; the bound), ``minference``
(vertical-slash from the last 64 queries), ``xattention`` (antidiagonal block scoring, cumulative
threshold), ``flexprefill`` (per-head query-aware vs vertical-slash by JS divergence, cumulative gamma with a
minimum budget), ``pooled`` and ``cluster`` (ours). With ``calibrate=True`` (default) each searches a per-head
knob so that exact recall on sampled rows reaches ``p`` (see ``core.py``).
"""

from __future__ import annotations

from attnlab.registry import Registry

#: name -> block predictor class (``BLOCK_PREDICTORS.get(name)(**options).predict(q, k, p=...)``)
BLOCK_PREDICTORS: Registry = Registry("block predictor", "--block-predictor")

from .core import (  # noqa: E402
    BlockPrediction,
    ScoredBlockMethod,
    exact_block_mass,
    head_recall,
    mass_select,
    row_block_mass,
    sample_rows,
    tile_density,
)
from . import oracle, minference, xattention, flexprefill, ours  # noqa: E402,F401  (registration)

__all__ = [
    "BLOCK_PREDICTORS",
    "BlockPrediction",
    "ScoredBlockMethod",
    "exact_block_mass",
    "head_recall",
    "make_block_predictor",
    "mass_select",
    "row_block_mass",
    "sample_rows",
    "tile_density",
]


def make_block_predictor(name: str, **options: object) -> ScoredBlockMethod:
    """Instantiate the registered block predictor ``name`` with ``options`` (its dataclass fields)."""
    return BLOCK_PREDICTORS.get(name)(**options)
