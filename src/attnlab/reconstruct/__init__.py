"""Reconstruction of attention scores from partial computation (Bhojanapalli et al. 2021, second half).

Compute the scores of a subset of query-key pairs exactly and estimate the rest from statistics fitted
on a corpus. Public API:

- selection: :func:`select`, :func:`budget_count`, :func:`make_proxy`, ``STRATEGIES``
- estimation: one registered object per estimator (:data:`ESTIMATOR_REGISTRY`, :class:`EstimatorKind`, each with
  its cost); :class:`Estimator`, :class:`RowModel`, ``ESTIMATORS``
- fitting: :func:`fit_corpus`, :func:`fit_from_windows`, :func:`fit_from_spectrum`, :class:`ReconstructionFit`
- evaluation: :class:`Combo`, :class:`Method`, :func:`make_methods`, :func:`evaluate`, metrics in :mod:`.metrics`
- total compute: :func:`cost_breakdown`, :func:`method_cost` (units of dense QK^T multiply-adds); frontier:
  :func:`candidates`, :func:`evaluate_points`, :func:`best_at` (worst-layer TV vs total compute per method family)
- drop-in: :func:`approximate`, :class:`ApproxAttention`, :func:`output_effect`
- runs: :func:`reconstruct`, :func:`train` (training comparison), :func:`render_section`
- long context (causal LMs, one chunk of rows at a time, no N x N array): :mod:`.long` (chunked machinery), :mod:`.long_run`
  (:func:`study_length`, :func:`run_long`; `attnlab reconstruct long`)

Names are imported lazily (PEP 562) so that ``attnlab reconstruct --help`` does not import torch;
``attnlab.reconstruct(out, ...)`` runs :func:`attnlab.reconstruct.run.reconstruct`.
"""

from __future__ import annotations

from .._lazy import lazy_package

_EXPORTS = {
    "ApproxAttention": "approx",
    "approximate": "approx",
    "output_effect": "approx",
    "cost_breakdown": "cost",
    "method_cost": "cost",
    "SELECTION_COSTS": "cost",
    "ESTIMATOR_COSTS": "cost",
    "FAMILIES": "frontier",
    "candidates": "frontier",
    "evaluate_points": "frontier",
    "best_at": "frontier",
    "ESTIMATORS": "estimators",
    "ESTIMATOR_REGISTRY": "estimators",
    "EstimatorKind": "estimators",
    "register_estimator": "estimators",
    "Estimator": "estimators",
    "RowModel": "estimators",
    "Combo": "evaluate",
    "Method": "evaluate",
    "evaluate": "evaluate",
    "exact_row_mean": "evaluate",
    "make_methods": "evaluate",
    "ReconstructionFit": "fit",
    "fit_corpus": "fit",
    "fit_from_spectrum": "fit",
    "fit_from_windows": "fit",
    "MetricSums": "metrics",
    "kl_divergence": "metrics",
    "relative_error": "metrics",
    "row_metrics": "metrics",
    "topk_agreement": "metrics",
    "total_variation": "metrics",
    "render_section": "report",
    "study_length": "long_run",
    "run_long": "long_run",
    "ReconstructConfig": "config",
    "reconstruct": "run",
    "train": "run",
    "STRATEGIES": "selection",
    "budget_count": "selection",
    "make_proxy": "selection",
    "select": "selection",
}

lazy_package(__name__, _EXPORTS, call="attnlab.reconstruct.run:reconstruct")
