"""Streaming mean / covariance in float64, mergeable across batches and ranks (Chan et al.'s update).

Centred second moments are accumulated per batch and merged with the mean-difference correction, so
large offsets (logits around 1e4) lose no precision, unlike a running sum of squares.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..errors import NumericalError, ShapeError


class StreamingCovariance:
    """Mean and covariance of D-dimensional samples seen in batches; ``merge`` combines two streams."""

    def __init__(self, dim: int, diag_only: bool = False, device: str | torch.device = "cpu"):
        self.dim, self.diag_only = dim, diag_only
        self.n = 0
        self.mean = torch.zeros(dim, dtype=torch.float64, device=device)
        self.m2 = torch.zeros(dim if diag_only else (dim, dim), dtype=torch.float64, device=device)

    def update(self, x: torch.Tensor) -> "StreamingCovariance":
        """Add samples ``x`` of shape (n, D)."""
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise ShapeError(f"expected samples of shape (n, {self.dim}), got {tuple(x.shape)}")
        if x.shape[0] == 0:
            return self
        x = x.detach().to(self.mean.device, torch.float64)
        if not torch.isfinite(x).all():
            raise NumericalError("NaN or inf in the samples given to the covariance (check the scores / mask)")
        n_b = x.shape[0]
        mean_b = x.mean(0)
        xc = x - mean_b
        m2_b = (xc * xc).sum(0) if self.diag_only else xc.T @ xc
        self._merge_moments(n_b, mean_b, m2_b)
        return self

    def _merge_moments(self, n_b: int, mean_b: torch.Tensor, m2_b: torch.Tensor) -> None:
        n_a = self.n
        n = n_a + n_b
        delta = mean_b - self.mean
        corr = delta * delta if self.diag_only else torch.outer(delta, delta)
        self.m2 = self.m2 + m2_b + corr * (n_a * n_b / n)
        self.mean = self.mean + delta * (n_b / n)
        self.n = n

    def merge(self, other: "StreamingCovariance") -> "StreamingCovariance":
        """Merge another stream into this one (in place); returns self."""
        if other.dim != self.dim or other.diag_only != self.diag_only:
            raise ShapeError(f"cannot merge statistics of dim {other.dim} into dim {self.dim}")
        if other.n:
            self._merge_moments(other.n, other.mean.clone(), other.m2.clone())
        return self

    def all_reduce(self, group=None) -> "StreamingCovariance":
        """Merge this statistic across all ranks of ``torch.distributed`` (exact, two all-reduces)."""
        import torch.distributed as dist

        n = torch.tensor([float(self.n)], dtype=torch.float64, device=self.mean.device)
        total = self.mean * self.n
        dist.all_reduce(n, group=group)
        dist.all_reduce(total, group=group)
        mean = total / n.clamp_min(1)
        delta = self.mean - mean
        corr = delta * delta if self.diag_only else torch.outer(delta, delta)
        m2 = self.m2 + corr * self.n
        dist.all_reduce(m2, group=group)
        self.n, self.mean, self.m2 = int(n.item()), mean, m2
        return self

    def covariance(self, ddof: int = 1) -> torch.Tensor:
        """Sample covariance (D, D) (or its diagonal)."""
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
    def from_state(cls, tensors: dict[str, torch.Tensor], prefix: str = "") -> "StreamingCovariance":
        """Rebuild from :meth:`state`."""
        mean, m2 = tensors[f"{prefix}mean"], tensors[f"{prefix}m2"]
        s = cls(mean.shape[0], diag_only=m2.dim() == 1)
        s.n, s.mean, s.m2 = int(tensors[f"{prefix}n"].item()), mean.double(), m2.double()
        return s


class FrequentDirections:
    """Mergeable streaming sketch B (ell x D) with B^T B ~ X^T X (Liberty 2013; Ghashami et al. 2016).

    Used for full-matrix PCA where D = N^2 is too large for a covariance. Combined with the exact
    mean it yields the top eigenpairs of the covariance; eigenvalues are underestimated by at most
    ||X - X_k||_F^2 / (ell - k), so ranks-for-variance read from it are conservative (upper bounds).
    """

    def __init__(self, dim: int, ell: int, device: str | torch.device = "cpu"):
        if ell < 2:
            raise ShapeError(f"--sketch-size must be >= 2 (got {ell}); 0 disables the full-matrix analysis")
        self.dim, self.ell = dim, ell
        self.buf = torch.zeros(0, dim, dtype=torch.float64, device=device)

    def update(self, x: torch.Tensor) -> "FrequentDirections":
        """Add rows ``x`` (n, D)."""
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise ShapeError(f"expected rows of shape (n, {self.dim}), got {tuple(x.shape)}")
        self.buf = torch.cat([self.buf, x.detach().to(self.buf.device, torch.float64)])
        if self.buf.shape[0] >= 2 * self.ell:
            self._shrink()
        return self

    def _shrink(self) -> None:
        _, s, vh = torch.linalg.svd(self.buf, full_matrices=False)
        if s.shape[0] > self.ell:
            s2 = (s[: self.ell] ** 2 - s[self.ell] ** 2).clamp_min(0)
            self.buf = s2.sqrt()[:, None] * vh[: self.ell]
        else:
            self.buf = s[:, None] * vh

    def merge(self, other: "FrequentDirections") -> "FrequentDirections":
        """Merge another sketch (stack then shrink)."""
        self.buf = torch.cat([self.buf, other.buf])
        self._shrink()
        return self

    def sketch(self) -> torch.Tensor:
        """The current sketch (at most ell rows)."""
        if self.buf.shape[0] > self.ell:
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


def finite_or_raise(x: torch.Tensor, what: str) -> torch.Tensor:
    """Raise ``NumericalError`` naming ``what`` if ``x`` has NaN or inf."""
    if not torch.isfinite(x).all():
        raise NumericalError(f"NaN or inf in {what}")
    return x


def row_centre(scores: torch.Tensor, valid: Optional[torch.Tensor]) -> torch.Tensor:
    """Centre each score row over its valid keys (softmax is shift-invariant); masked entries become 0."""
    if valid is None:
        return scores - scores.mean(-1, keepdim=True)
    v = valid.expand_as(scores)
    s = torch.where(v, scores, torch.zeros_like(scores))
    cnt = v.sum(-1, keepdim=True).clamp_min(1)
    mean = s.sum(-1, keepdim=True) / cnt
    return torch.where(v, scores - mean, torch.zeros_like(scores))
