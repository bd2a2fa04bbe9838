"""Row-model estimators: the fitted statistics of one (layer, head) (:class:`RowModel`) and the shared machinery
of the estimators built on them (:class:`Estimator`; one subclass per registered ``row-model`` estimator).

Score rows ``s`` have an unknown constant offset (softmax is shift-invariant and fitted statistics are of
row-centred scores), so a row is modelled as ``s = c + m 1`` with ``c`` Gaussian (mean ``mu``, covariance
``Sigma``) and ``m`` a free offset (flat prior), estimated from the observed pairs or, when the exact row mean is
given, known. Observed entries are always returned exactly; keys the model masks are -inf. Observed keys that
are masked are ignored (infinite noise). Rows are processed in chunks, vectorised over rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from ...errors import ConfigError, ShapeError
from .base import ESTIMATOR_REGISTRY, EstimatorKind, NameView


@dataclass
class RowModel:
    """Fitted statistics of one (layer, head): row mean (N,) or per query position (N, N), covariance (N, N)."""

    mean: torch.Tensor
    cov: torch.Tensor
    basis: Optional[torch.Tensor] = None  # (N, k) top eigenvectors (basis estimator)
    eigvals: Optional[torch.Tensor] = None  # (k,) their eigenvalues
    sigma_res: float = 0.0  # mean variance per entry left outside the basis

    @property
    def n(self) -> int:
        """Keys per row."""
        return self.cov.shape[0]

    def with_basis(self, k: int, eigen: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> "RowModel":
        """A copy with the top-k eigenbasis of ``cov`` attached (``eigen``: precomputed descending eigenpairs)."""
        n = self.n
        if not 1 <= k <= n:
            raise ConfigError(f"--k {k} must be in [1, --seq-len {n}]")
        if eigen is None:
            evals, evecs = torch.linalg.eigh(self.cov.double())
            evals, evecs = evals.flip(0).clamp_min(0), evecs.flip(1)
        else:
            evals, evecs = eigen
        res = float(evals[k:].sum()) / n
        return RowModel(self.mean, self.cov, evecs[:, :k], evals[:k], res)

    def row_means(self, n_rows_per_seq: int, batch: int, dtype, device) -> torch.Tensor:
        """Mean of every row (batch, Nq, N)."""
        m = self.mean.to(device, dtype)
        if m.dim() == 1:
            return m.expand(batch, n_rows_per_seq, -1)
        if m.shape[0] != n_rows_per_seq:
            raise ShapeError(f"position-conditioned mean has {m.shape[0]} query positions, rows have {n_rows_per_seq}")
        return m.expand(batch, -1, -1)


def expand_idx(idx: torch.Tensor, batch: int, nq: int) -> torch.Tensor:
    """Selection indices ((b,), (Nq, b) or (B or 1, Nq, b)) as (B, Nq, b)."""
    if idx.dim() == 1:
        return idx.expand(batch, nq, -1)
    if idx.dim() == 2:
        if idx.shape[0] != nq:
            raise ShapeError(f"per-position selection has {idx.shape[0]} rows, attention has {nq} queries")
        return idx.expand(batch, -1, -1)
    if idx.dim() == 3:
        return idx.expand(batch, -1, -1) if idx.shape[0] == 1 else idx
    raise ShapeError(f"selection indices must be (b,), (N, b) or (B, N, b); got {tuple(idx.shape)}")


ESTIMATORS = NameView("row-model")  # kinds of :class:`Estimator`


def _row_class(kind: str) -> type["Estimator"]:
    if kind not in ESTIMATORS:
        raise ConfigError(f"--estimator must be one of {', '.join(ESTIMATORS)} (got {kind!r})")
    return ESTIMATOR_REGISTRY.get(kind).row_class  # type: ignore[attr-defined]


class Estimator:
    """Reconstruct full score rows of one (layer, head) from a selection of exactly computed pairs.

    ``Estimator(kind, model, ...)`` builds the registered row-model estimator ``kind`` (a subclass); subclasses
    implement :meth:`_chunk` (the estimate of a chunk of rows) and the optional hooks."""

    def __new__(cls, kind: Optional[str] = None, *args: Any, **kwargs: Any) -> "Estimator":
        return super().__new__(_row_class(kind) if cls is Estimator else cls)

    def __init__(self, kind: str, model: RowModel, k: Optional[int] = None, ridge: float = 1.0, jitter: float = 1e-5,
                 dtype: torch.dtype = torch.float64, chunk_rows: int = 4096, var_correction: bool = False):
        if ridge < 0 or jitter < 0:
            raise ConfigError(f"--ridge and --jitter must be >= 0 (got {ridge}, {jitter})")
        self.kind, self.dtype, self.chunk_rows = kind, dtype, chunk_rows
        self.var_correction = var_correction
        self.k, self.ridge = k, ridge
        self.model = model = self._prepare_model(model)
        diag_mean = float(torch.diagonal(model.cov).double().mean().clamp_min(1e-12))
        self.jitter_abs = jitter * diag_mean
        self.diag_mean = diag_mean
        self._cov = model.cov.to(dtype)
        self._setup()

    def _prepare_model(self, model: RowModel) -> RowModel:
        """Hook: the statistics this estimator needs (e.g. with a basis attached)."""
        return model

    def _setup(self) -> None:
        """Hook: precompute what the estimator needs from ``self.model``."""

    def _to(self, device) -> None:
        """Move the precomputed tensors to ``device`` (subclasses move theirs too)."""
        if self._cov.device != torch.device(device):
            self._cov = self._cov.to(device)

    def _check(self, idx: torch.Tensor) -> None:
        """Hook: raise ConfigError when the selection cannot be used."""

    def estimate(self, scores: torch.Tensor, idx: torch.Tensor, valid: Optional[torch.Tensor] = None,
                 row_mean: Optional[torch.Tensor] = None, proxy: Optional[torch.Tensor] = None) -> torch.Tensor:
        """:class:`~.base.HeadEstimator` protocol (the proxy is not read)."""
        return self(scores, idx, valid, row_mean)

    def __call__(self, scores: torch.Tensor, idx: torch.Tensor, valid: Optional[torch.Tensor] = None,
                 row_mean: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Estimated scores (B, Nq, N) from true ``scores`` (B, Nq, N) (only entries at ``idx`` are read) and the
        selection ``idx`` ((b,), (Nq, b) or (B, Nq, b)); ``valid`` (B or 1, Nq, N) bool marks allowed keys.

        ``row_mean`` (B, Nq): the exact mean score of each row over its valid keys, q . mean(k) * scaling (one
        extra dot product per row); when given the offset is known instead of estimated, and since centred rows
        sum to zero the estimate then also knows the total of the unobserved scores."""
        if scores.dim() != 3:
            raise ShapeError(f"scores must be (B, Nq, N) for one head, got {tuple(scores.shape)}")
        B, nq, n = scores.shape
        if n != self.model.n:
            raise ShapeError(f"rows have {n} keys but the fitted statistics have {self.model.n} (--seq-len mismatch)")
        if idx.shape[-1] > n:
            raise ConfigError(f"--budget {idx.shape[-1]} exceeds --seq-len {n}")
        self._check(idx)
        dev = scores.device
        self._to(dev)
        s = scores.to(self.dtype)
        vmask = None if valid is None else valid.expand(B, nq, n)
        if vmask is not None:
            s = torch.where(vmask, s, torch.zeros_like(s))
        shared = idx.dim() == 1
        full = expand_idx(idx.to(dev), B, nq)  # (B, Nq, b)
        obs = torch.gather(s, -1, full)  # (B, Nq, b)
        mu = self.model.row_means(nq, B, self.dtype, dev)  # (B, Nq, N)
        r = obs - torch.gather(mu, -1, full)
        known = row_mean is not None
        if known:
            rm = row_mean.to(dev, self.dtype).unsqueeze(-1)  # (B, Nq, 1)
            r = r - rm
            mu = mu + rm
        obs_valid = None if vmask is None else torch.gather(vmask, -1, full)
        est = self._estimate(r, full, mu, obs_valid, shared, known)
        est = est.scatter(-1, full, obs)  # observed entries exact
        if vmask is not None:
            est = est.masked_fill(~vmask, float("-inf"))
        return est.to(scores.dtype) if scores.dtype.is_floating_point else est

    def _estimate(self, r, full, mu, obs_valid, shared, known) -> torch.Tensor:
        """Every entry of every row (B, Nq, N), chunk by chunk of rows."""
        B, nq, b = full.shape
        R = B * nq
        rr, ii = r.reshape(R, b), full.reshape(R, b)
        mu_f = mu.reshape(R, -1)
        w_ok = None if obs_valid is None else obs_valid.reshape(R, b)
        out = torch.empty_like(mu_f)
        for a in range(0, R, self.chunk_rows):
            sl = slice(a, a + self.chunk_rows)
            out[sl] = self._chunk(rr[sl], ii[sl], mu_f[sl], None if w_ok is None else w_ok[sl], shared, known)
        return out.reshape(B, nq, -1)

    def _chunk(self, r, idx, mu, ok, shared, known) -> torch.Tensor:
        """Estimate of rows r = s_S - mu_S (R, b) at indices idx (R, b), means mu (R, N), observed-valid ok."""
        raise NotImplementedError


class RowModelKind(EstimatorKind):
    """A registered row-model estimator: built as ``row_class(name, fitted statistics, ...)`` per (layer, head)."""

    row_class: type[Estimator] = Estimator

    def fitted(self, method: Any, layer: int, head: int) -> tuple[RowModel, Optional[int]]:
        """The statistics and the basis size ``method`` uses for (layer, head)."""
        return method.row_model(layer, head), method.k

    def build(self, method: Any, layer: int, head: int) -> Estimator:
        """The estimator of (layer, head) over the method's fitted statistics."""
        model, k = self.fitted(method, layer, head)
        return self.row_class(self.name, model, k=k, ridge=method.ridge, jitter=method.jitter, dtype=method.dtype,
                              var_correction=method.combo.var)
