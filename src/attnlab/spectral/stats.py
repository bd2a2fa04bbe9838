"""Streaming mean / covariance in float64, mergeable across batches and ranks (Chan et al.'s update).

Centred second moments are accumulated per batch and merged with the mean-difference correction, so
large offsets (logits around 1e4) lose no precision, unlike a running sum of squares.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..errors import NumericalError, ShapeError


class StreamingCovariance:
    """Mean and covariance of D-dimensional samples seen in batches; ``merge`` combines two streams.

    With ``groups=G`` it holds G independent statistics that see the same number of samples
    (e.g. the heads of one layer) and ``update`` takes (G, n, D): one batched update for all.
    """

    def __init__(self, dim: int, diag_only: bool = False, device: str | torch.device = "cpu", groups: int = 0):
        self.dim, self.diag_only, self.groups = dim, diag_only, groups
        lead = (groups,) if groups else ()
        self.n = 0
        self.mean = torch.zeros(*lead, dim, dtype=torch.float64, device=device)
        self.m2 = torch.zeros(*lead, *((dim,) if diag_only else (dim, dim)), dtype=torch.float64, device=device)

    def update(self, x: torch.Tensor) -> "StreamingCovariance":
        """Add samples ``x`` of shape (n, D), or (G, n, D) for grouped statistics."""
        want = 3 if self.groups else 2
        if x.dim() != want or x.shape[-1] != self.dim or (self.groups and x.shape[0] != self.groups):
            shape = f"({self.groups}, n, {self.dim})" if self.groups else f"(n, {self.dim})"
            raise ShapeError(f"expected samples of shape {shape}, got {tuple(x.shape)}")
        n_b = x.shape[-2]
        if n_b == 0:
            return self
        x = x.detach().to(self.mean.device, torch.float64)
        if not torch.isfinite(x).all():
            raise NumericalError("NaN or inf in the samples given to the covariance (check the scores / mask)")
        mean_b = x.mean(-2)
        xc = x - mean_b.unsqueeze(-2)
        m2_b = (xc * xc).sum(-2) if self.diag_only else xc.transpose(-1, -2) @ xc
        self._merge_moments(n_b, mean_b, m2_b)
        return self

    def _outer(self, delta: torch.Tensor) -> torch.Tensor:
        return delta * delta if self.diag_only else delta.unsqueeze(-1) * delta.unsqueeze(-2)

    def _merge_moments(self, n_b: int, mean_b: torch.Tensor, m2_b: torch.Tensor) -> None:
        n_a = self.n
        n = n_a + n_b
        delta = mean_b - self.mean
        self.m2 = self.m2 + m2_b + self._outer(delta) * (n_a * n_b / n)
        self.mean = self.mean + delta * (n_b / n)
        self.n = n

    def merge(self, other: "StreamingCovariance") -> "StreamingCovariance":
        """Merge another stream into this one (in place); returns self."""
        if (other.dim, other.diag_only, other.groups) != (self.dim, self.diag_only, self.groups):
            raise ShapeError(f"cannot merge statistics of dim {other.dim} (groups {other.groups}) into dim {self.dim} "
                             f"(groups {self.groups})")
        if other.n:
            self._merge_moments(other.n, other.mean.clone(), other.m2.clone())
        return self

    def group(self, g: int) -> "StreamingCovariance":
        """The ungrouped statistic of group ``g`` (a view-free copy)."""
        out = StreamingCovariance(self.dim, self.diag_only, self.mean.device)
        out.n, out.mean, out.m2 = self.n, self.mean[g].clone(), self.m2[g].clone()
        return out

    def all_reduce(self, group=None) -> "StreamingCovariance":
        """Merge this statistic across all ranks of ``torch.distributed`` (exact, two all-reduces)."""
        from ..distributed import all_reduce_

        n = torch.tensor([float(self.n)], dtype=torch.float64, device=self.mean.device)
        total = self.mean * self.n
        all_reduce_(n, group=group)
        all_reduce_(total, group=group)
        mean = total / n.clamp_min(1)
        m2 = self.m2 + self._outer(self.mean - mean) * self.n
        all_reduce_(m2, group=group)
        self.n, self.mean, self.m2 = int(n.item()), mean, m2
        return self

    def covariance(self, ddof: int = 1) -> torch.Tensor:
        """Sample covariance (D, D) (or its diagonal; with a leading G for grouped statistics)."""
        if self.n <= ddof:
            raise NumericalError(f"covariance needs more than {ddof} samples (got {self.n}); use more sequences")
        return self.m2 / (self.n - ddof)

    def state(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """Tensors to save (safetensors)."""
        return {f"{prefix}n": torch.tensor([self.n], dtype=torch.int64), f"{prefix}mean": self.mean.cpu(),
                f"{prefix}m2": self.m2.cpu()}

    def to(self, device: str | torch.device) -> "StreamingCovariance":
        """Move the accumulators to ``device`` (in place)."""
        self.mean, self.m2 = self.mean.to(device), self.m2.to(device)
        return self

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], prefix: str = "", groups: int = 0) -> "StreamingCovariance":
        """Rebuild from :meth:`state`."""
        mean, m2 = tensors[f"{prefix}mean"], tensors[f"{prefix}m2"]
        s = cls(mean.shape[-1], diag_only=m2.dim() == mean.dim(), groups=groups)
        s.n, s.mean, s.m2 = int(tensors[f"{prefix}n"].item()), mean.double(), m2.double()
        return s


class StreamingSketch:
    """Mergeable streaming sketch B (ell x D) with B^T B <= X^T X, for PCA where D = N^2 is too large.

    Rows are buffered and, when 2*ell have gathered, replaced by their top-ell singular directions
    (incremental / streaming truncated SVD). Every truncation removes a positive semi-definite part, so
    the sketch's eigenvalues are lower bounds and ranks-for-variance read from it are upper bounds; on
    decaying spectra the leading eigenvalues come out within about 1%. ``shrink=True`` gives Frequent
    Directions (Liberty 2013) instead: a worst-case bound ||X - X_k||_F^2 / (ell - k), but a much larger
    downward bias in practice. With ``groups=G`` it keeps G sketches; ``update`` takes (G, n, D).
    """

    def __init__(self, dim: int, ell: int, device: str | torch.device = "cpu", groups: int = 0,
                 shrink: bool = False):
        if ell < 2:
            raise ShapeError(f"--sketch-size must be >= 2 (got {ell}); 0 disables the full-matrix analysis")
        self.dim, self.ell, self.groups, self.shrink = dim, ell, groups, shrink
        self.buf = torch.zeros(*((groups,) if groups else ()), 0, dim, dtype=torch.float64, device=device)

    def update(self, x: torch.Tensor) -> "StreamingSketch":
        """Add rows ``x`` (n, D), or (G, n, D) when grouped."""
        want = 3 if self.groups else 2
        if x.dim() != want or x.shape[-1] != self.dim:
            raise ShapeError(f"expected rows of shape {'(G, n, D)' if self.groups else '(n, D)'} with D={self.dim}, "
                             f"got {tuple(x.shape)}")
        self.buf = torch.cat([self.buf, x.detach().to(self.buf.device, torch.float64)], dim=-2)
        if self.buf.shape[-2] >= 2 * self.ell:
            self._shrink()
        return self

    def _shrink(self) -> None:
        _, s, vh = torch.linalg.svd(self.buf, full_matrices=False)
        if s.shape[-1] > self.ell:
            top = s[..., : self.ell]
            if self.shrink:
                top = (top**2 - s[..., self.ell: self.ell + 1] ** 2).clamp_min(0).sqrt()
            self.buf = top.unsqueeze(-1) * vh[..., : self.ell, :]
        else:
            self.buf = s.unsqueeze(-1) * vh

    def merge(self, other: "StreamingSketch") -> "StreamingSketch":
        """Merge another sketch (stack then shrink)."""
        self.buf = torch.cat([self.buf, other.buf], dim=-2)
        self._shrink()
        return self

    def sketch(self) -> torch.Tensor:
        """The current sketch (at most ell rows; (G, ell, D) when grouped)."""
        if self.buf.shape[-2] > self.ell:
            self._shrink()
        return self.buf


def sketch_covariance_eig(sketch: torch.Tensor, mean: torch.Tensor, n: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k eigenpairs of (B^T B - n mu mu^T) / (n - 1) within span(rows of B, mu)."""
    basis = torch.cat([sketch, mean[None]]).T  # (D, ell+1)
    q, _ = torch.linalg.qr(basis)
    bq = sketch @ q  # (ell, r)
    mq = mean @ q  # (r,)
    small = (bq.T @ bq - n * torch.outer(mq, mq)) / max(n - 1, 1)
    evals, evecs = torch.linalg.eigh(small)
    order = torch.argsort(evals, descending=True)[:k]
    return evals[order].clamp_min(0), q @ evecs[:, order]


def pooled_within(stats: list[StreamingCovariance]) -> torch.Tensor:
    """Heads pooled with equal weight: the mean of their covariances, each scaled to unit total variance.

    Each head's covariance is its own centred second moment, so differences between the heads' mean rows
    (not variation over inputs) stay out; the unit-trace scaling stops one high-variance head from
    deciding the pooled spectrum on its own.
    """
    covs = []
    for s in stats:
        c = s.covariance()
        total = torch.trace(c)
        covs.append(c / total if total > 0 else c)
    return torch.stack(covs).mean(0)


def gram_covariance(x: torch.Tensor) -> torch.Tensor:
    """The M x M Gram matrix of the centred samples, Xc Xc^T / (M - 1), in float64, from samples x (M, D): it has
    the same nonzero eigenvalues as the D x D sample covariance (exact whole-matrix spectra when M < D)."""
    if x.dim() != 2 or x.shape[0] < 2:
        raise ShapeError(f"need samples (M >= 2, D), got {tuple(x.shape)}")
    xc = x.double()
    xc = xc - xc.mean(0, keepdim=True)
    return (xc @ xc.T) / (x.shape[0] - 1)


def row_centre(scores: torch.Tensor, valid: Optional[torch.Tensor]) -> torch.Tensor:
    """Centre each score row over its valid keys (softmax is shift-invariant); masked entries become 0."""
    if valid is None:
        return scores - scores.mean(-1, keepdim=True)
    v = valid.expand_as(scores)
    s = torch.where(v, scores, torch.zeros_like(scores))
    cnt = v.sum(-1, keepdim=True).clamp_min(1)
    mean = s.sum(-1, keepdim=True) / cnt
    return torch.where(v, scores - mean, torch.zeros_like(scores))
