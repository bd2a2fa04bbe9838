"""``gaussian``: the conditional-Gaussian estimator with a diffuse offset (kriging), and its cost.

The best linear unbiased predictor mu_R + m + S_RS S_SS^-1 (s_S - mu_S - m 1) with m estimated by generalised
least squares (or known from the exact row mean). Exact when the data are Gaussian with the fitted statistics.
One Cholesky per row, or one shared gain matrix when the selection is shared by all rows.
"""

from __future__ import annotations

from typing import Optional

import torch

from ...errors import ConfigError
from ..cost_shape import CostShape
from .base import register_estimator
from .row import Estimator, RowModelKind

_MASKED_NOISE = 1e8  # relative noise variance that makes a masked observed key carry no information


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


class GaussianEstimator(Estimator):
    """Conditional Gaussian mean of the unselected scores given the selected (``var_correction``: plus half the
    conditional variance, the lognormal mass correction)."""

    def _chunk(self, r, idx, mu, ok, shared, known) -> torch.Tensor:
        cov = self._cov
        if shared and ok is None:
            return self._shared_chunk(r, idx[0], mu, known)
        noise = None if ok is None else (~ok).to(r.dtype) * (_MASKED_NOISE * self.diag_mean)
        m, w, cond_var = _gaussian_rows(r, idx, cov, noise, self.jitter_abs, known, self.var_correction)
        est = mu + m.unsqueeze(-1) + torch.einsum("rbn,rb->rn", cov[idx], w)
        return est if cond_var is None else est + 0.5 * cond_var

    def _shared_chunk(self, r, sel, mu, known) -> torch.Tensor:
        """One gain matrix for every row (the selection ``sel`` is shared, no observed key masked)."""
        cov = self._cov
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


def gaussian_cost(s: CostShape) -> dict[str, float]:
    """Shared gains: (r - m) G over the unobserved keys plus the fill, G = A^-1 Sigma_SR once per head (setup);
    per row: Cholesky of the b x b observed covariance, two triangular solves per right-hand side, the product
    Sigma_RS w over the unobserved keys, plus the fill."""
    b, u, n = s.b, s.u, s.n
    rhs = 1 if s.offset_known else 2  # residual (and the all-ones vector for the GLS offset)
    if s.shared:
        per_row = b * u + u + (0 if s.offset_known else b)
        setup = b ** 3 / 6 + b * b * n + (b * b if not s.offset_known else 0)
        return {"per_row": float(per_row), "setup": float(setup)}
    per_row = b ** 3 / 6 + rhs * b * b + b * u + u + (0 if s.offset_known else 2 * b)
    return {"per_row": float(per_row), "setup": 0.0}


@register_estimator
class GaussianKind(RowModelKind):
    """Registry entry of ``gaussian``."""

    name = "gaussian"
    help = "conditional Gaussian mean of the unselected scores given the selected"
    tags = ("row-model",)
    row_class = GaussianEstimator

    def cost(self, s: CostShape) -> dict[str, float]:
        """Conditional Gaussian (kriging); shared or per-row gains."""
        return gaussian_cost(s)


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
