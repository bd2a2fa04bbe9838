"""The token-graph -> block adapter: any Sparsefinder predictor executed as a block pattern.

:func:`as_block_predictor` is the one place that bridges token-level predictors (an (N, N) graph through
``predict``, or bucket ids through ``assign``) and block-level ones (``predict_blocks``), so every
predictor runs in ``sparse_attention``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor

from attnlab.blocksparse.blockmask import BlockPattern
from attnlab.blocksparse.predictors.cluster import pattern_from_ids
from attnlab.blocksparse.predictors.core import BlockPredictor
from attnlab.blocksparse.predictors.pooled import PooledBudgetPredictor, check_call
from attnlab.errors import ConfigError

__all__ = ["AssignBlockPredictor", "TokenGraphBlocks", "as_block_predictor"]


@dataclasses.dataclass
class AssignBlockPredictor:
    """Adapter: any predictor with ``assign(q, k) -> (q_ids, k_ids)`` of shape (B, H, N, n_hash) (token-level
    bucket/cluster predictors) -> permuted block pattern. Uses hash round ``round`` (a single permutation
    per call; several rounds would need several attention calls merged by log-sum-exp)."""

    predictor: Any
    round: int = 0
    inner: PooledBudgetPredictor | None = None

    def predict_blocks(self, q: Tensor, k: Tensor, block_size: int = 128, causal: bool = False,
                       scale: float | None = None) -> BlockPattern:
        """q, k -> permuted :class:`BlockPattern` from the wrapped predictor's bucket ids."""
        check_call(q, k, block_size, scale)
        q_ids, k_ids = self.predictor.assign(q, k)
        if q_ids.dim() == 3:
            q_ids, k_ids = q_ids.unsqueeze(-1), k_ids.unsqueeze(-1)
        return pattern_from_ids(q, k, q_ids[..., self.round].long(), k_ids[..., self.round].long(),
                                 block_size, causal, self.inner, scale)


@dataclasses.dataclass
class TokenGraphBlocks:
    """Block face of a token-level predictor: its (N, N) graph, any kept pair keeping the tile (O(N^2): small N)."""

    predictor: Any

    def predict_blocks(self, q: Tensor, k: Tensor, block_size: int = 128, causal: bool = False,
                       scale: float | None = None) -> BlockPattern:
        """q, k -> :class:`BlockPattern` of the tiles that hold a predicted pair."""
        from attnlab.blocksparse.blockmask import pattern_from_block_graph, token_to_block_graph

        valid = torch.ones(q.shape[0], q.shape[2], dtype=torch.bool, device=q.device)
        g = self.predictor.predict(q, k, valid).bool()
        g = token_to_block_graph(g, block_size).expand(q.shape[0], q.shape[1], -1, -1)
        return pattern_from_block_graph(g, block_size, causal)


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
