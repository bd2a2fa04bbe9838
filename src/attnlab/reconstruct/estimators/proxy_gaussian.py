"""``proxy+gaussian``: s = p + e with p the low-rank proxy score (known for every pair) and e the proxy's residual,
modelled like a row of :mod:`.gaussian` with statistics fitted on residual rows; the conditional-Gaussian estimate
of e_R from the observed residuals e_S = s_S - p_S is added to p_R (kriging of the residual). And its cost."""

from __future__ import annotations

from typing import Any, Optional

import torch

from ...errors import ConfigError, ShapeError
from ..cost_shape import CostShape
from .base import EstimatorKind, register_estimator
from .gaussian import GaussianEstimator, gaussian_cost
from .row import RowModel, expand_idx


class ResidualEstimator:
    """``proxy+gaussian``: s_R = p_R + e_R, with e_R the conditional-Gaussian estimate of the proxy residual
    e = s - p from the observed residuals e_S = s_S - p_S, under statistics ``model`` of row-centred residuals."""

    def __init__(self, model: RowModel, jitter: float = 1e-5, dtype: torch.dtype = torch.float64,
                 chunk_rows: int = 4096, var_correction: bool = False):
        self.gaussian = GaussianEstimator("gaussian", model, jitter=jitter, dtype=dtype, chunk_rows=chunk_rows,
                                          var_correction=var_correction)

    def estimate(self, scores: torch.Tensor, idx: torch.Tensor, valid: Optional[torch.Tensor] = None,
                 row_mean: Optional[torch.Tensor] = None, proxy: Optional[torch.Tensor] = None) -> torch.Tensor:
        """:class:`~.base.HeadEstimator` protocol."""
        if proxy is None:
            raise ConfigError("the proxy+gaussian estimator needs the proxy scores of every pair")
        return self(scores, proxy, idx, valid, row_mean)

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
        full = expand_idx(idx.to(scores.device), B, nq)
        est = est.scatter(-1, full, torch.gather(scores.to(dt), -1, full))  # observed entries exact (no p - p roundoff)
        if valid is not None:
            est = est.masked_fill(~v, float("-inf"))
        return est.to(scores.dtype) if scores.dtype.is_floating_point else est


@register_estimator
class ProxyGaussianKind(EstimatorKind):
    """Registry entry of ``proxy+gaussian``: per-head residual statistics of the method's proxy."""

    name = "proxy+gaussian"
    help = "conditional Gaussian on the proxy residual"
    tags = ("proxy", "residual")

    def build(self, method: Any, layer: int, head: int) -> ResidualEstimator:
        """The residual statistics of the method's proxy (kind, rank, seed) for (layer, head)."""
        model = method.fit.residual_model(layer, head, method.proxy, method.proxy_rank, method.seed,
                                          method.combo.position)
        return ResidualEstimator(model, jitter=method.jitter, dtype=method.dtype, var_correction=method.combo.var)

    def validate(self, combo: Any) -> None:
        """Residual statistics are per head."""
        if combo.pool_heads:
            raise ConfigError("proxy+gaussian has per-head residual statistics only (no pooled heads)")

    def check(self, fit: Any, b: int, kw: dict[str, Any]) -> None:
        """Fail before evaluating anything when the residual statistics are missing."""
        fit.residual_model(fit.layers[0], fit.heads[0], kw.get("proxy", "bilinear"), kw.get("proxy_rank", 4),
                           kw.get("seed", 0))

    def cost(self, s: CostShape) -> dict[str, float]:
        """The Gaussian on the residual, plus e_S = s_S - p_S (b) and p_R + e_R (u)."""
        g = gaussian_cost(s)
        return {"per_row": g["per_row"] + s.b + s.u, "setup": g["setup"]}
