"""Eigen analysis: spectra, explained-variance curves, rank for a variance level, subspace overlap."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from scipy.linalg import subspace_angles

from ..errors import ConfigError, NumericalError, ShapeError

LEVELS = (0.9, 0.95, 0.99)


def eigh_desc(cov: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (descending, clipped at 0) and eigenvectors (columns) of a symmetric matrix in float64."""
    if not torch.isfinite(cov).all():
        raise NumericalError("NaN or inf in covariance")
    evals, evecs = torch.linalg.eigh(cov.double())
    return evals.flip(0).clamp_min(0), evecs.flip(1)


def explained_variance(evals: torch.Tensor, total: float | None = None) -> torch.Tensor:
    """Cumulative explained-variance fraction curve (k = 1..len)."""
    total = float(evals.sum()) if total is None else float(total)
    if total <= 0:
        return torch.ones_like(evals, dtype=torch.float64)
    return (torch.cumsum(evals.double(), 0) / total).clamp_max(1.0)


def rank_for(curve: torch.Tensor, level: float) -> int:
    """Smallest k with explained variance >= level (len(curve) + 1 if never reached)."""
    if not 0 < level <= 1:
        raise ConfigError(f"variance level must be in (0, 1] (got {level})")
    hits = torch.nonzero(curve >= level - 1e-12)
    return int(hits[0].item()) + 1 if len(hits) else len(curve) + 1


def ranks_for(curve: torch.Tensor, levels: Sequence[float] = LEVELS) -> dict[str, int]:
    """Ranks needed for each variance level, keyed like 'k90'."""
    return {f"k{round(level * 100)}": rank_for(curve, level) for level in levels}


def _orth(u: torch.Tensor | np.ndarray) -> np.ndarray:
    u = np.asarray(u, dtype=np.float64)
    if u.ndim != 2:
        raise ShapeError(f"a basis must be a (D, k) matrix, got shape {u.shape}")
    q, _ = np.linalg.qr(u)
    return q


def subspace_similarity(u1: torch.Tensor | np.ndarray, u2: torch.Tensor | np.ndarray) -> float:
    """Normalised overlap ||U1^T U2||_F^2 / k of two k-dim subspaces (1 = same, 0 = orthogonal)."""
    a, b = _orth(u1), _orth(u2)
    if a.shape[0] != b.shape[0]:
        raise ShapeError(f"bases live in different spaces (dim {a.shape[0]} vs {b.shape[0]}); same --seq-len needed")
    k = min(a.shape[1], b.shape[1])
    return float(np.linalg.norm(a.T @ b) ** 2 / k)


def principal_angles(u1: torch.Tensor | np.ndarray, u2: torch.Tensor | np.ndarray) -> np.ndarray:
    """Principal angles (radians, ascending) between the column spaces of two bases."""
    a, b = np.asarray(u1, dtype=np.float64), np.asarray(u2, dtype=np.float64)
    if a.shape[0] != b.shape[0]:
        raise ShapeError(f"bases live in different spaces (dim {a.shape[0]} vs {b.shape[0]})")
    return np.sort(subspace_angles(a, b))


def overlap_matrix(bases_a: Sequence, bases_b: Sequence | None = None) -> np.ndarray:
    """Matrix of subspace similarities between two lists of bases (a list with itself if b is None)."""
    bases_b = bases_a if bases_b is None else bases_b
    return np.array([[subspace_similarity(a, b) for b in bases_b] for a in bases_a])
