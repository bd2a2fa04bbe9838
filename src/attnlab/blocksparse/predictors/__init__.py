"""Block predictors for long-context prefill, behind one interface and one registry.

Every entry of :data:`BLOCK_PREDICTORS` is a dataclass whose instances have
``predict(q, k, causal=True, block_size=128, p=0.95, scale=None) -> BlockPrediction``: q (B, H, N, D),
k (B, Hk, N, D) (grouped-query heads are expanded), a mean mass-recall target ``p`` per head; the result
holds a :class:`~attnlab.blocksparse.blockmask.BlockPattern` whose kv lists keep FULL tiles (no mask_mod)
apart from PARTIAL ones (the causal diagonal), the multiply-adds the prediction cost, and the per-head knob.
They also have ``predict_blocks(q, k, block_size, causal, scale) -> BlockPattern`` (``sparse_attention``'s
interface).

Methods (one file each): ``oracle`` / ``oracle-global`` (exact block mass; the bound), ``minference``
(vertical-slash from the last 64 queries), ``xattention`` (antidiagonal block scoring, cumulative
threshold), ``flexprefill`` (per-head query-aware vs vertical-slash by JS divergence, cumulative gamma with a
minimum budget), ``pooled`` and ``cluster`` (ours), ``full`` (every causal tile: the equivalence check).
With ``calibrate=True`` (default) each searches a per-head knob so that exact recall on sampled rows
reaches ``p`` (see ``core.py``).

A new block predictor is one file here that registers its class with ``@BLOCK_PREDICTORS.register(name)``,
plus its import line below.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from attnlab.errors import ConfigError

from .registry import BLOCK_PREDICTORS
from .core import (
    BlockPrediction,
    ScoredBlockMethod,
    exact_block_mass,
    head_recall,
    mass_select,
    row_block_mass,
    sample_rows,
    tile_density,
)
# registration, in the order --predictor lists them
from . import oracle, minference, xattention, flexprefill, pooled, cluster, full  # noqa: E402,F401

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


def make_block_predictor(name: str, flag: str = "--block-predictor", **options: Any) -> Any:
    """Instantiate the registered block predictor ``name`` with ``options`` (its dataclass fields); an unknown
    name or option is a ConfigError naming ``flag``."""
    if name not in BLOCK_PREDICTORS:
        raise ConfigError(f"{flag}: unknown block predictor {name!r}; choose from {', '.join(BLOCK_PREDICTORS.names())}")
    cls = BLOCK_PREDICTORS.get(name)
    fields = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set(options)
    bad = sorted(set(options) - fields)
    if bad:
        what = "takes no options" if not fields else f"takes {', '.join(sorted(fields))}"
        raise ConfigError(f"{flag} {name}: {what}, got {bad}")
    return cls(**options)



