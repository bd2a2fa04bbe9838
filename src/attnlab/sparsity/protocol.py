"""One predictor protocol for token- and block-level sparsity prediction, and the predictor registry.

A sparsity predictor is registered by name in :data:`PREDICTORS` (tags: ``default`` = run by
``attnlab sparsity run`` unless ``--methods`` says otherwise, ``learned`` = fits projections and takes
``rank``/``epochs``/``projector``). Token-level predictors give an (N, N) graph through ``predict``;
block-level ones give a tile pattern through ``predict_blocks``. :func:`as_block_predictor` is the one
place that bridges the two, so every predictor runs in ``sparse_attention`` (and every registered one in
the Pareto evaluation). Adding a predictor is one file plus one registration::

    @PREDICTORS.register("my-method", help="what it does", tags=("default",))
    class MyPredictor(BasePredictor): ...

This module imports neither ``attnlab.models`` nor entmax (it runs on the GPU box with the flex path).
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable

import torch
from torch import Tensor

from attnlab.errors import ConfigError
from attnlab.registry import Registry
from attnlab.sparsity.block_predictors import AssignBlockPredictor, BlockPredictor
from attnlab.sparsity.blockmask import BlockPattern

#: Sparsity predictors by name (classes or factories taking keyword settings).
PREDICTORS: Registry[Callable[..., Any]] = Registry("predictor", "--methods")


def build_predictor(name: str, seed: int = 0, learned: dict | None = None, **kw: Any) -> Any:
    """Instantiate the predictor registered as ``name``: ``learned`` settings (rank, epochs, projector) go to
    predictors tagged ``learned``, ``seed`` to those whose constructor takes one; ``kw`` to all."""
    factory = PREDICTORS.get(name)
    if "learned" in PREDICTORS.entry(name).tags:
        kw = {**(learned or {}), **kw}
    if _takes(factory, "seed"):
        kw["seed"] = seed
    return factory(**kw)


def _takes(factory: Callable[..., Any], name: str) -> bool:
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):  # builtins without a signature
        return False
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


@dataclasses.dataclass
class TokenGraphBlocks:
    """Block face of a token-level predictor: its (N, N) graph, any kept pair keeping the tile (O(N^2): small N)."""

    predictor: Any

    def predict_blocks(self, q: Tensor, k: Tensor, block_size: int = 128, causal: bool = False,
                       scale: float | None = None) -> BlockPattern:
        """q, k -> :class:`BlockPattern` of the tiles that hold a predicted pair."""
        from attnlab.sparsity.flex import resolve_pattern

        valid = torch.ones(q.shape[0], q.shape[2], dtype=torch.bool, device=q.device)
        g = self.predictor.predict(q, k, valid)
        return resolve_pattern(q, k, g.bool(), block_size, None, causal, scale)


def as_block_predictor(predictor: Any, budget: float | int | None = None) -> BlockPredictor:
    """The block-level face of any predictor: its own ``predict_blocks`` (``budget`` replaces its budget field
    when given), its bucket ids (``assign``) as a permuted pattern, or its token graph (``predict``)."""
    if isinstance(predictor, BlockPredictor):
        if budget is None:
            return predictor
        if not (dataclasses.is_dataclass(predictor) and hasattr(predictor, "budget")):
            raise ConfigError(f"budget given but {type(predictor).__name__} has no budget field")
        return dataclasses.replace(predictor, budget=budget)
    if callable(getattr(predictor, "assign", None)):
        return AssignBlockPredictor(predictor)
    if callable(getattr(predictor, "predict", None)):
        return TokenGraphBlocks(predictor)
    raise ConfigError(f"cannot use {type(predictor).__name__} as a predictor: it has neither predict_blocks, "
                      "assign nor predict")
