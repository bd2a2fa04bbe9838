"""``full``: every causal tile kept, at no prediction cost -- the equivalence check of the sparse path (its
output must equal dense attention)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from attnlab.blocksparse.blockmask import BlockPattern, block_graph_to_kv, causal_block_graph

from .core import BlockPrediction, check_inputs
from .registry import BLOCK_PREDICTORS


@BLOCK_PREDICTORS.register("full", help="every causal tile (dense through the sparse kernel: the equivalence check)",
                           tags=("reference",))
@dataclass
class FullBlocks:
    """Keep every (causal) tile; ``p`` is ignored and the prediction costs nothing."""

    @torch.no_grad()
    def predict(self, q: Tensor, k: Tensor, causal: bool = True, block_size: int = 128, p: float | None = None,
                scale: float | None = None) -> BlockPrediction:
        """q (B, H, N, D), k -> :class:`BlockPrediction` of every tile (causal: the lower triangle)."""
        check_inputs(q, k, block_size)
        B, H, N, _ = q.shape
        nq, nk = N // block_size, k.shape[2] // block_size
        g = causal_block_graph(nq, nk, q.device) if causal else torch.ones(nq, nk, dtype=torch.bool, device=q.device)
        return BlockPrediction(BlockPattern(block_graph_to_kv(g.expand(B, H, nq, nk), causal), block_size, causal), 0.0)

    def predict_blocks(self, q: Tensor, k: Tensor, block_size: int = 128, causal: bool = False,
                       scale: float | None = None) -> BlockPattern:
        """The block-predictor interface of ``sparse_attention``."""
        return self.predict(q, k, causal, block_size, None, scale).pattern
