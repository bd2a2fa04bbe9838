"""Token permutations of clustered patterns: tokens sorted by cluster id so that predicted pairs become dense
blocks, and scattered back afterwards."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["cluster_permutation", "inverse_permutation", "permute_tokens", "unpermute_tokens"]


def cluster_permutation(ids: Tensor) -> tuple[Tensor, Tensor]:
    """Cluster ids (B, H, N) ints -> (perm, inv): ``perm`` sorts tokens by id (stable, so original order
    within a cluster), ``inv`` undoes it (``x_sorted[..., inv, :] == x``)."""
    perm = torch.argsort(ids, dim=-1, stable=True)
    return perm, inverse_permutation(perm)


def permute_tokens(x: Tensor, perm: Tensor) -> Tensor:
    """Gather tokens: x (B, H, N, D), perm (B, H, N) -> x[b, h, perm[b, h, i]]."""
    return torch.gather(x, 2, perm.unsqueeze(-1).expand(*perm.shape, x.shape[-1]))


def unpermute_tokens(x_sorted: Tensor, perm: Tensor) -> Tensor:
    """Inverse of :func:`permute_tokens` (scatter back to the original positions)."""
    out = torch.empty_like(x_sorted)
    out.scatter_(2, perm.unsqueeze(-1).expand(*perm.shape, x_sorted.shape[-1]), x_sorted)
    return out


def inverse_permutation(perm: Tensor) -> Tensor:
    """perm (..., N) -> inv with inv[perm[i]] = i."""
    inv = torch.empty_like(perm)
    inv.scatter_(-1, perm, torch.arange(perm.shape[-1], device=perm.device).expand_as(perm))
    return inv
