"""Gold sparsity graphs: the exact support of alpha-entmax attention, and graph validation helpers.

A *graph* is a boolean tensor (B, H, Nq, Nk): True where query i attends to key j. ``valid`` is the
model's own mask (padding / causality), boolean and broadcastable to (B, H, Nq, Nk); None = all valid.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..errors import AttnlabError, ShapeError
from ..models.attention import check_alpha, masked_entmax


class GraphError(AttnlabError, ValueError):
    """A sparsity graph is unusable (e.g. the gold graph has no edge at all)."""


def check_qk(q: torch.Tensor, k: torch.Tensor) -> None:
    """Validate a (B, H, N, dh) query / key pair."""
    if q.dim() != 4 or k.dim() != 4:
        raise ShapeError(f"q and k must be (batch, heads, seq, d_head); got {tuple(q.shape)} and {tuple(k.shape)}")
    if q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ShapeError(f"q {tuple(q.shape)} and k {tuple(k.shape)} differ in batch, heads or d_head")


def full_valid(valid: Optional[torch.Tensor], shape: tuple[int, ...], device=None) -> torch.Tensor:
    """``valid`` expanded to ``shape`` (B, H, Nq, Nk) as bool; all True if None."""
    if valid is None:
        return torch.ones(shape, dtype=torch.bool, device=device)
    try:
        return valid.bool().expand(shape)
    except RuntimeError as e:
        raise ShapeError(f"valid mask of shape {tuple(valid.shape)} does not broadcast to graphs {tuple(shape)}") from e


def check_graphs(pred: torch.Tensor, gold: torch.Tensor, valid: Optional[torch.Tensor] = None) -> None:
    """Raise ``ShapeError`` unless ``pred`` and ``gold`` are (B, H, Nq, Nk) graphs of one shape (and valid fits)."""
    if pred.dim() != 4 or gold.dim() != 4:
        raise ShapeError(f"graphs must be (batch, heads, Nq, Nk); got predicted {tuple(pred.shape)}, gold {tuple(gold.shape)}")
    if pred.shape != gold.shape:
        raise ShapeError(f"predicted graph shape {tuple(pred.shape)} != gold graph shape {tuple(gold.shape)}")
    if valid is not None:
        full_valid(valid, tuple(gold.shape))


def check_gold(gold: torch.Tensor) -> None:
    """Raise ``GraphError`` if the gold graph has no edge (recall would be undefined)."""
    if not bool(gold.any()):
        raise GraphError("gold graph is empty (no query attends to any key): every row fully masked? "
                         "check the padding mask / --seq-len")


def attention_scores(q: torch.Tensor, k: torch.Tensor, scaling: Optional[float] = None) -> torch.Tensor:
    """Scaled scores QK^T * scaling (default 1/sqrt(d_head)) in float32, (B, H, Nq, Nk)."""
    check_qk(q, k)
    s = q.shape[-1] ** -0.5 if scaling is None else scaling
    return (q.float() @ k.float().transpose(-1, -2)) * s


def entmax_probs(q: torch.Tensor, k: torch.Tensor, valid: Optional[torch.Tensor] = None,
                 alpha: float | torch.Tensor = 1.5, scaling: Optional[float] = None) -> torch.Tensor:
    """alpha-entmax attention probabilities (float32) with masked keys exactly 0."""
    if not isinstance(alpha, torch.Tensor):
        check_alpha(alpha)
    scores = attention_scores(q, k, scaling)
    allowed = None if valid is None else full_valid(valid, tuple(scores.shape), scores.device)
    return masked_entmax(scores, allowed, alpha)


def gold_graph(q: torch.Tensor, k: torch.Tensor, valid: Optional[torch.Tensor] = None,
               alpha: float | torch.Tensor = 1.5, scaling: Optional[float] = None, check: bool = True) -> torch.Tensor:
    """Gold graph: support of entmax(QK^T / sqrt(d)) after masks, bool (B, H, Nq, Nk).

    alpha == 1.5 uses the exact sort-based ``entmax15``; other alphas (or a per-head tensor) use
    ``entmax_bisect``. ``check`` raises ``GraphError`` when the graph is empty.
    """
    p = entmax_probs(q, k, valid, alpha, scaling)
    g = p > 0
    if valid is not None:
        g &= full_valid(valid, tuple(g.shape), g.device)
    if check:
        check_gold(g)
    return g


def gold_from_probs(probs: torch.Tensor, valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Gold graph from already computed entmax probabilities (support, masked)."""
    g = probs > 0
    if valid is not None:
        g &= full_valid(valid, tuple(g.shape), g.device)
    return g


def restrict(graph: torch.Tensor, valid: Optional[torch.Tensor]) -> torch.Tensor:
    """``graph`` AND ``valid`` (valid None = unchanged)."""
    return graph if valid is None else graph & full_valid(valid, tuple(graph.shape), graph.device)


def graph_from_ids(q_ids: torch.Tensor, k_ids: torch.Tensor) -> torch.Tensor:
    """Edge (i, j) iff the id sets of query i and key j intersect; ids (B, H, N, S) -> graph (B, H, Nq, Nk).

    Ids of different slots (hash rounds, coordinates) must come from disjoint ranges, as
    every ``assign`` in attnlab returns them.
    """
    if q_ids.dim() != 4 or k_ids.dim() != 4 or q_ids.shape[:2] != k_ids.shape[:2]:
        raise ShapeError(f"ids must be (B, H, N, slots); got {tuple(q_ids.shape)} and {tuple(k_ids.shape)}")
    B, H, Nq, S = q_ids.shape
    g = torch.zeros(B, H, Nq, k_ids.shape[2], dtype=torch.bool, device=q_ids.device)
    for i in range(S):
        for j in range(k_ids.shape[-1]):
            g |= q_ids[..., i, None] == k_ids[..., None, :, j]
    return g
