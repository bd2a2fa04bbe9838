"""Attention sparsity (Sparsefinder): gold entmax graphs, learned predictors, baselines, metrics, Pareto.

Names are imported lazily (PEP 562) so that ``attnlab sparsity --help`` does not import torch;
``attnlab.sparsity(out, ...)`` runs :func:`attnlab.sparsity.run.sparsity`. GPU execution of predicted
patterns: :func:`sparse_attention` (FlexAttention block masks; exact masked fallback on CPU).
"""

from __future__ import annotations

from .._lazy import lazy_package

_EXPORTS = {
    "GraphError": "graphs", "attention_scores": "graphs", "check_gold": "graphs", "check_graphs": "graphs",
    "entmax_probs": "graphs", "gold_from_probs": "graphs", "gold_graph": "graphs", "graph_from_ids": "graphs",
    "HeadMetrics": "metrics", "average_layers": "metrics", "graph_metrics": "metrics", "pareto_front": "metrics",
    "recall_at_sparsity": "metrics",
    "METHODS": "predictors", "PREDICTORS": "predictors", "BasePredictor": "predictors", "BigBirdPredictor": "predictors",
    "BucketPredictor": "predictors", "ClusteringPredictor": "predictors", "DistancePredictor": "predictors",
    "LSHPredictor": "predictors", "OracleTopK": "predictors", "Predictor": "predictors", "Projector": "predictors",
    "QuantizationPredictor": "predictors", "RoutingPredictor": "predictors", "WindowPredictor": "predictors",
    "make_predictor": "predictors", "LongformerPredictor": "predictors", "StridedPredictor": "predictors",
    "RankPredictor": "predictors", "save_predictors": "predictors.persist", "load_predictors": "predictors.persist",
    "HFFinetuneConfig": "finetune_hf", "entmax_finetuned": "finetune_hf",
    "sparse_entmax_attention": "sparse_entmax", "dense_entmax_attention": "sparse_entmax",
    "block_mask_from_graph": "sparse_entmax",
    "EntmaxTrainConfig": "train_entmax", "VocabMap": "vocab", "entmax_handler": "entmax_hf",
    "finetune_hf_entmax": "entmax_hf", "load_small": "train_entmax", "save_small": "train_entmax",
    "train_small": "train_entmax",
    "LayerData": "evaluate", "capture_layers": "evaluate", "downstream_hf": "evaluate", "downstream_small": "evaluate", "downstream": "evaluate",
    "fit_layers": "evaluate", "sweep_method": "evaluate",
    "sparsity": "run", "pareto_table": "run",
    "render_section": "report",
    "sparse_attention": "flex", "dense_attention_sdpa": "flex", "mass_recall": "flex",
    "BlockPattern": "blockmask",
    "BLOCK_PREDICTORS": "blocks", "make_block_predictor": "blocks", "BlockPrediction": "blocks",
    "PooledBlockPredictor": "block_predictors",
    "ClusterBlockPredictor": "block_predictors", "AssignBlockPredictor": "block_predictors",
}

lazy_package(__name__, _EXPORTS, call="attnlab.sparsity.run:sparsity")
