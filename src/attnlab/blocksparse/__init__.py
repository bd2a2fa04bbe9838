"""Block-sparse execution: block predictors, block patterns and BlockMasks, the FlexAttention runner, sparse
prefill of a real causal LM, and sparse entmax attention.

This package may use Sparsefinder (:mod:`attnlab.sparsity`) through :mod:`attnlab.blocksparse.adapter`;
Sparsefinder never imports it. Names are imported lazily so that ``import attnlab`` does not import torch.
"""

from __future__ import annotations

from .._lazy import lazy_package

_EXPORTS = {
    "sparse_attention": "flex", "dense_attention_sdpa": "flex", "mass_recall": "recall", "run_pattern": "flex",
    "resolve_pattern": "flex",
    "BlockPattern": "blockmask", "block_graph_to_blockmask": "blockmask", "token_to_block_graph": "blockmask",
    "BLOCK_PREDICTORS": "predictors", "make_block_predictor": "predictors", "BlockPrediction": "predictors",
    "PooledBudgetPredictor": "predictors.pooled", "PooledMassPredictor": "predictors.pooled",
    "PooledBlockPredictor": "block_predictors", "ClusterBlockPredictor": "predictors.cluster",
    "ClusterBlocks": "predictors.cluster", "BlockPredictor": "predictors.core",
    "AssignBlockPredictor": "adapter", "TokenGraphBlocks": "adapter", "as_block_predictor": "adapter",
    "sample_rows": "recall", "head_recall": "recall", "pattern_row_recall": "recall",
    "sparse_entmax_attention": "sparse_entmax", "dense_entmax_attention": "sparse_entmax",
    "block_mask_from_graph": "sparse_entmax",
    "PrefillConfig": "prefill", "run_prefill": "prefill",
}

lazy_package(__name__, _EXPORTS)
