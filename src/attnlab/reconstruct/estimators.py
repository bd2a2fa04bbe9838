"""Estimators of the unobserved scores of a row from its observed ones, per (layer, head).

Both estimators work on score rows ``s`` whose constant offset is unknown (softmax is shift-invariant
and fitted statistics are of row-centred scores), so a row is modelled as ``s = c + m 1`` with ``c``
Gaussian (mean ``mu``, covariance ``Sigma``) and ``m`` a free offset (flat prior):

- ``gaussian``: the best linear unbiased predictor mu_R + m + S_RS S_SS^-1 (s_S - mu_S - m 1) with m
  estimated by generalised least squares (the conditional-Gaussian estimator with a diffuse offset).
  Exact when the data are Gaussian with the fitted statistics.
- ``basis``: least squares for coefficients a in the top-k eigenbasis U plus the offset,
  s_S ~ mu_S + U_S a + m 1, with ridge penalty ``ridge * sigma_res^2 / lambda_j`` on a_j (the Bayesian
  ridge when the residual outside the basis is white with variance sigma_res^2; ridge=0 is plain LS).
- ``none``: no estimate; unobserved keys get -inf (sparse attention on the selected pairs).
- ``mean``: unobserved entries are mu_R + m (the prior mean shifted to the row).
- ``proxy+gaussian`` (:class:`ResidualEstimator`): s = p + e with p the low-rank proxy score (known for every
  pair) and e the proxy's residual, modelled like a row above with statistics fitted on residual rows; the
  ``gaussian`` estimate of e_R from the observed residuals e_S = s_S - p_S is added to p_R (kriging of the
  residual). ``proxy`` (p_R shifted to the row's mean, no fitted statistics) lives in :mod:`.evaluate`.

Observed entries are always returned exactly; keys the model masks are -inf. Observed keys that are
masked are ignored (infinite noise). Rows are processed in chunks, vectorised over rows with one
Cholesky per row, or one shared gain matrix when the selection is shared by all rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..errors import ConfigError, ShapeError
from ..registry import Registry

#: Estimators of the unselected scores by name. Tags: ``row-model`` (a kind of :class:`Estimator` over the
#: fitted row statistics), ``proxy`` (also reads the low-rank proxy scores of every pair).
ESTIMATOR_REGISTRY: Registry = Registry("estimator", "--estimators")
for _name, _help, _tags in (
        ("gaussian", "conditional Gaussian mean of the unselected scores given the selected", ("row-model",)),
        ("basis", "least squares in the top-k eigenbasis of the rows", ("row-model",)),
        ("none", "unselected keys masked out (attention over the selected pairs only)", ("row-model",)),
        ("mean", "the fitted mean row, shifted to the exact row mean", ("row-model",)),
        ("proxy", "the low-rank proxy scores, shifted to the exact row mean", ("proxy",)),
        ("proxy+gaussian", "conditional Gaussian on the proxy residual", ("proxy",))):
    ESTIMATOR_REGISTRY.add(_name, _name, _help, _tags)
ESTIMATORS = tuple(ESTIMATOR_REGISTRY.names("row-model"))  # kinds of :class:`Estimator`
PROXY_ESTIMATORS = tuple(ESTIMATOR_REGISTRY.names("proxy"))  # estimators that also read the proxy scores of every pair
ALL_ESTIMATORS = tuple(ESTIMATOR_REGISTRY.names())  # every name --estimators accepts
_MASKED_NOISE = 1e8  # relative noise variance that makes a masked observed key carry no information


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


def _expand_idx(idx: torch.Tensor, batch: int, nq: int) -> torch.Tensor:
    if idx.dim() == 1:
        return idx.expand(batch, nq, -1)
    if idx.dim() == 2:
        if idx.shape[0] != nq:
            raise ShapeError(f"per-position selection has {idx.shape[0]} rows, attention has {nq} queries")
        return idx.expand(batch, -1, -1)
    if idx.dim() == 3:
        return idx.expand(batch, -1, -1) if idx.shape[0] == 1 else idx
    raise ShapeError(f"selection indices must be (b,), (N, b) or (B, N, b); got {tuple(idx.shape)}")


def check_k(k: int, b: int) -> None:
    """The basis estimator needs at most as many coefficients as observed pairs."""
    if k > b:
        raise ConfigError(f"--k {k} exceeds --budget {b} pairs per row; the basis fit would be underdetermined")


def _chol_solve(rhs: torch.Tensor, chol: torch.Tensor) -> torch.Tensor:
    """A^-1 rhs from the lower Cholesky factor (two triangular solves; faster than cholesky_solve on CPU)."""
    y = torch.linalg.solve_triangular(chol, rhs, upper=False)
    return torch.linalg.solve_triangular(chol.mH, y, upper=True)


def _gaussian_rows(r: torch.Tensor, idx: torch.Tensor, cov: torch.Tensor, noise: Optional[torch.Tensor],
                   jitter: float, known: bool = False, var: bool = False):
    """For rows r = s_S - mu_S (R, b) with index sets idx (R, b): (offset (R,), weights w (R, b)) such that the
    estimate of every entry is mu + m + Sigma[:, S] w."""
    eye = torch.eye(idx.shape[-1], dtype=r.dtype, device=r.device)
    a = cov[idx.unsqueeze(-1), idx.unsqueeze(-2)] + jitter * eye  # (R, b, b)
    if noise is not None:
        a = a + torch.diag_embed(noise)
    chol, info = torch.linalg.cholesky_ex(a)
    if bool((info > 0).any()):
        raise ConfigError("observed-score covariance is not positive definite; raise --jitter")
    cond_var = None
    if var:
        c = cov[idx]  # (R, b, N)
        cond_var = (torch.diagonal(cov) - (c * _chol_solve(c, chol)).sum(-2)).clamp_min(0)  # (R, N)
    if known:
        return torch.zeros_like(r[:, 0]), _chol_solve(r.unsqueeze(-1), chol)[..., 0], cond_var
    ones = torch.ones_like(r)
    sol = _chol_solve(torch.stack([r, ones], -1), chol)  # (R, b, 2)
    ainv_r, ainv_1 = sol[..., 0], sol[..., 1]
    m = (ainv_r.sum(-1) / ainv_1.sum(-1))  # GLS offset (R,)
    return m, ainv_r - m.unsqueeze(-1) * ainv_1, cond_var


def _basis_rows(r: torch.Tensor, idx: torch.Tensor, basis: torch.Tensor, penalty: torch.Tensor,
                weight: Optional[torch.Tensor]) -> torch.Tensor:
    """Coefficients [a, m] (R, k+1) of ridge LS r ~ [U_S, 1] [a; m] (no penalty on m)."""
    phi = torch.cat([basis, torch.ones_like(basis[:, :1])], 1)[idx]  # (R, b, k+1)
    phw = phi if weight is None else phi * weight.unsqueeze(-1)
    gram = phw.transpose(-1, -2) @ phi + torch.diag(penalty)  # (R, k+1, k+1)
    rhs = (phw.transpose(-1, -2) @ r.unsqueeze(-1))
    # A tiny floor keeps the offset direction solvable when all observed keys are masked.
    gram = gram + 1e-10 * gram.diagonal(dim1=-2, dim2=-1).mean(-1, keepdim=True).unsqueeze(-1) * torch.eye(
        gram.shape[-1], dtype=gram.dtype, device=gram.device)
    return torch.linalg.solve(gram, rhs).squeeze(-1)


class Estimator:
    """Reconstruct full score rows of one (layer, head) from a selection of exactly computed pairs."""

    def __init__(self, kind: str, model: RowModel, k: Optional[int] = None, ridge: float = 1.0, jitter: float = 1e-5,
                 dtype: torch.dtype = torch.float64, chunk_rows: int = 4096, var_correction: bool = False):
        if kind not in ESTIMATORS:
            raise ConfigError(f"--estimator must be one of {', '.join(ESTIMATORS)} (got {kind!r})")
        if ridge < 0 or jitter < 0:
            raise ConfigError(f"--ridge and --jitter must be >= 0 (got {ridge}, {jitter})")
        self.kind, self.dtype, self.chunk_rows = kind, dtype, chunk_rows
        self.var_correction = var_correction
        if kind == "basis":
            if k is None:
                raise ConfigError("the basis estimator needs --k (basis size)")
            model = model.with_basis(k) if model.basis is None or model.basis.shape[1] != k else model
        self.model, self.k, self.ridge = model, k, ridge
        diag_mean = float(torch.diagonal(model.cov).double().mean().clamp_min(1e-12))
        self.jitter_abs = jitter * diag_mean
        self.diag_mean = diag_mean
        self._cov = model.cov.to(dtype)
        if kind == "basis":
            lam = model.eigvals.double().clamp_min(1e-12 * diag_mean)
            pen = ridge * max(model.sigma_res, 1e-12 * diag_mean) / lam
            self._basis = model.basis.to(dtype)
            self._penalty = torch.cat([pen, torch.zeros(1, dtype=torch.float64)]).to(dtype)

    def _to(self, device) -> None:
        if self._cov.device != torch.device(device):
            self._cov = self._cov.to(device)
            if self.kind == "basis":
                self._basis, self._penalty = self._basis.to(device), self._penalty.to(device)

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
        if self.kind == "basis":
            check_k(self.k, idx.shape[-1])
        dev = scores.device
        self._to(dev)
        s = scores.to(self.dtype)
        vmask = None if valid is None else valid.expand(B, nq, n)
        if vmask is not None:
            s = torch.where(vmask, s, torch.zeros_like(s))
        shared = idx.dim() == 1
        full = _expand_idx(idx.to(dev), B, nq)  # (B, Nq, b)
        obs = torch.gather(s, -1, full)  # (B, Nq, b)
        mu = self.model.row_means(nq, B, self.dtype, dev)  # (B, Nq, N)
        r = obs - torch.gather(mu, -1, full)
        known = row_mean is not None
        if known:
            rm = row_mean.to(dev, self.dtype).unsqueeze(-1)  # (B, Nq, 1)
            r = r - rm
            mu = mu + rm
        obs_valid = None if vmask is None else torch.gather(vmask, -1, full)
        if self.kind == "none":
            est = torch.full_like(s, float("-inf"))
        else:
            est = self._estimate(r, full, mu, obs_valid, shared, known)
        est = est.scatter(-1, full, obs)  # observed entries exact
        if vmask is not None:
            est = est.masked_fill(~vmask, float("-inf"))
        return est.to(scores.dtype) if scores.dtype.is_floating_point else est

    def _estimate(self, r, full, mu, obs_valid, shared, known) -> torch.Tensor:
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
        if self.kind == "mean":
            if known:
                return mu
            w = torch.ones_like(r) if ok is None else ok.to(r.dtype)
            m = (r * w).sum(-1) / w.sum(-1).clamp_min(1)
            return mu + m.unsqueeze(-1)
        if self.kind == "gaussian":
            cov = self._cov
            if shared and ok is None:
                sel = idx[0]
                a = cov[sel][:, sel] + self.jitter_abs * torch.eye(len(sel), dtype=cov.dtype, device=cov.device)
                chol = torch.linalg.cholesky(a)
                gain = _chol_solve(cov[sel], chol)  # (b, N) = A^-1 Sigma_S.
                if known:
                    m = torch.zeros_like(r[:, 0])
                else:
                    ainv_1 = _chol_solve(torch.ones(len(sel), 1, dtype=cov.dtype, device=cov.device), chol)[:, 0]
                    m = (r @ ainv_1) / ainv_1.sum()
                # est = mu + m + (r - m 1) A^-1 Sigma_S.
                est = mu + m.unsqueeze(-1) + (r - m.unsqueeze(-1)) @ gain
                if self.var_correction:
                    est = est + 0.5 * (torch.diagonal(cov) - (cov[sel] * gain).sum(0)).clamp_min(0)
                return est
            noise = None if ok is None else (~ok).to(r.dtype) * (_MASKED_NOISE * self.diag_mean)
            m, w, cond_var = _gaussian_rows(r, idx, cov, noise, self.jitter_abs, known, self.var_correction)
            est = mu + m.unsqueeze(-1) + torch.einsum("rbn,rb->rn", cov[idx], w)
            return est if cond_var is None else est + 0.5 * cond_var
        # basis
        pen = self._penalty
        if known:  # offset known: pin its coefficient at 0 with a prohibitive penalty
            pen = torch.cat([pen[:-1], pen.new_tensor([1e12 * self.diag_mean])])
        coef = _basis_rows(r, idx, self._basis, pen, None if ok is None else ok.to(r.dtype))
        return mu + coef[:, -1:] + coef[:, :-1] @ self._basis.T


class ResidualEstimator:
    """``proxy+gaussian``: s_R = p_R + e_R, with e_R the conditional-Gaussian estimate of the proxy residual
    e = s - p from the observed residuals e_S = s_S - p_S, under statistics ``model`` of row-centred residuals."""

    def __init__(self, model: RowModel, jitter: float = 1e-5, dtype: torch.dtype = torch.float64,
                 chunk_rows: int = 4096, var_correction: bool = False):
        self.gaussian = Estimator("gaussian", model, jitter=jitter, dtype=dtype, chunk_rows=chunk_rows,
                                  var_correction=var_correction)

    def __call__(self, scores: torch.Tensor, proxy: torch.Tensor, idx: torch.Tensor,
                 valid: Optional[torch.Tensor] = None, row_mean: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Estimated scores (B, Nq, N) from the true ``scores`` (only entries at ``idx`` are read) and the proxy
        scores ``proxy`` (B, Nq, N) of every pair; ``idx``, ``valid`` and ``row_mean`` (the exact mean of each score
        row over its valid keys) as for :meth:`Estimator.__call__`."""
        if proxy.shape != scores.shape:
            raise ShapeError(f"proxy scores {tuple(proxy.shape)} and scores {tuple(scores.shape)} differ in shape")
        B, nq, n = scores.shape
        dt = self.gaussian.dtype
        p = proxy.to(scores.device, dt)
        v = torch.ones_like(p, dtype=torch.bool) if valid is None else valid.expand(B, nq, n)
        p = torch.where(v, p, torch.zeros_like(p))
        resid_mean = None
        if row_mean is not None:  # the residual row's exact mean: mean(s) - mean(p) over the valid keys
            resid_mean = row_mean.to(scores.device, dt) - p.sum(-1) / v.sum(-1).clamp_min(1)
        est = self.gaussian(scores.to(dt) - p, idx, valid, resid_mean) + p  # -inf stays -inf where masked
        full = _expand_idx(idx.to(scores.device), B, nq)
        est = est.scatter(-1, full, torch.gather(scores.to(dt), -1, full))  # observed entries exact (no p - p roundoff)
        if valid is not None:
            est = est.masked_fill(~v, float("-inf"))
        return est.to(scores.dtype) if scores.dtype.is_floating_point else est


def reference_gaussian(x_obs, obs_idx, mean, cov, jitter: float = 0.0, row_mean=None):
    """Float64 numpy reference of the diffuse-offset conditional-Gaussian estimate of one row (tests)."""
    import numpy as np

    x_obs, mean, cov = (np.asarray(v, dtype=np.float64) for v in (x_obs, mean, cov))
    s = np.asarray(obs_idx)
    a = cov[np.ix_(s, s)] + jitter * np.eye(len(s))
    r = x_obs - mean[s]
    ainv = np.linalg.inv(a)
    one = np.ones(len(s))
    m = (one @ ainv @ r) / (one @ ainv @ one) if row_mean is None else float(row_mean)
    if row_mean is not None:
        mean = mean + m
        r = x_obs - mean[s]
        m = 0.0
    est = mean + m + cov[:, s] @ ainv @ (r - m * one)
    est[s] = x_obs
    return est
