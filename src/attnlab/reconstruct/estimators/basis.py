"""``basis``: ridge least squares in the top-k eigenbasis of the rows, and its cost.

Least squares for coefficients a in the top-k eigenbasis U plus the offset, s_S ~ mu_S + U_S a + m 1, with ridge
penalty ``ridge * sigma_res^2 / lambda_j`` on a_j (the Bayesian ridge when the residual outside the basis is white
with variance sigma_res^2; ridge=0 is plain LS).
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from ...errors import ConfigError
from ..cost_shape import CostShape
from .base import register_estimator
from .row import Estimator, RowModel, RowModelKind


def check_k(k: int, b: int) -> None:
    """The basis estimator needs at most as many coefficients as observed pairs."""
    if k > b:
        raise ConfigError(f"--k {k} exceeds --budget {b} pairs per row; the basis fit would be underdetermined")


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


class BasisEstimator(Estimator):
    """Ridge least squares for the coefficients of the top-k eigenbasis and the row offset."""

    def _prepare_model(self, model: RowModel) -> RowModel:
        if self.k is None:
            raise ConfigError("the basis estimator needs --k (basis size)")
        return model.with_basis(self.k) if model.basis is None or model.basis.shape[1] != self.k else model

    def _setup(self) -> None:
        model, diag_mean = self.model, self.diag_mean
        lam = model.eigvals.double().clamp_min(1e-12 * diag_mean)
        pen = self.ridge * max(model.sigma_res, 1e-12 * diag_mean) / lam
        self._basis = model.basis.to(self.dtype)
        self._penalty = torch.cat([pen, torch.zeros(1, dtype=torch.float64)]).to(self.dtype)

    def _to(self, device) -> None:
        if self._cov.device != torch.device(device):
            super()._to(device)
            self._basis, self._penalty = self._basis.to(device), self._penalty.to(device)

    def _check(self, idx: torch.Tensor) -> None:
        check_k(self.k, idx.shape[-1])

    def _chunk(self, r, idx, mu, ok, shared, known) -> torch.Tensor:
        pen = self._penalty
        if known:  # offset known: pin its coefficient at 0 with a prohibitive penalty
            pen = torch.cat([pen[:-1], pen.new_tensor([1e12 * self.diag_mean])])
        coef = _basis_rows(r, idx, self._basis, pen, None if ok is None else ok.to(r.dtype))
        return mu + coef[:, -1:] + coef[:, :-1] @ self._basis.T


@register_estimator
class BasisKind(RowModelKind):
    """Registry entry of ``basis``: the basis size is the method's k or, when None, min(k90 of the head, b)."""

    name = "basis"
    help = "least squares in the top-k eigenbasis of the rows"
    tags = ("row-model", "basis")
    row_class = BasisEstimator

    @staticmethod
    def basis_size(method: Any, layer: int, head: int) -> int:
        """--k, or min(k90 of the head, b)."""
        if method.k is not None:
            return method.k
        return min(method.fit.rank_for(layer, head, 0.9, method.combo.position, method.combo.pool_heads), method.b)

    def fitted(self, method: Any, layer: int, head: int) -> tuple[RowModel, Optional[int]]:
        """The method's statistics with the top-k eigenbasis attached."""
        k = self.basis_size(method, layer, head)
        c = method.combo
        model = method.row_model(layer, head)
        return model.with_basis(k, method.fit.eigen(layer, head, c.position, c.pool_heads)), k

    def check(self, fit: Any, b: int, kw: dict[str, Any]) -> None:
        """A given --k must not exceed the budget."""
        if kw.get("k") is not None:
            check_k(int(kw["k"]), b)

    def cost_k(self, method: Any) -> float:
        """The method's k or, when chosen per head, its mean over the fitted heads."""
        if method.k is not None:
            return float(method.k)
        fit = method.fit
        ks = [self.basis_size(method, l, h) for l in fit.layers for h in fit.heads]
        return sum(ks) / len(ks)

    def cost(self, s: CostShape) -> dict[str, float]:
        """Shared: coefficients = P r with P the (k+1) x b ridge pseudo-inverse (once per head), then U_R a; per row:
        Gram Phi_S^T Phi_S, right-hand side, LU solve, reconstruction over the unobserved keys."""
        k1, b = s.k + 1, s.b
        if s.shared:
            return {"per_row": float(k1 * b + k1 * s.u), "setup": float(b * k1 * k1 + k1 ** 3 / 3 + k1 * k1 * b)}
        return {"per_row": float(b * k1 * k1 + b * k1 + k1 ** 3 / 3 + k1 * s.u), "setup": 0.0}
