"""Sparse prefill with an estimated remainder: the softmax mass of the dropped tiles, estimated from cheap
per-tile key/value statistics and merged with the exact sparse part under the joint softmax normaliser.

Causal block-sparse prefill computes, for every query ``i``, the exact attention over the pairs of its kept
tiles: ``out_i = sum_K e^{s_ij} v_j / Z_K`` and ``lse_i = log Z_K`` (natural log; what FlexAttention's
``return_lse`` / ``AuxRequest(lse=True)`` returns: its kernel keeps base-2 statistics internally and the public
function multiplies them by ln 2 before returning). Every dropped tile lies strictly below the diagonal (the
diagonal tile is always kept), so all of its keys are visible to every query of the query tile, and the
remainder of row ``i`` is ``sum_t sum_{j in t} e^{s_ij} (v_j)``. An estimator gives, per (query, dropped
(sub-)tile ``t``), a log mass ``L_it ~ log sum_{j in t} e^{s_ij}`` and a value ``V_it ~ sum_j e^{s_ij} v_j /
e^{L_it}``; with ``L_R = logsumexp_t L_it`` and ``V_R = sum_t softmax_t(L_it) V_it`` the merged row is

    lse' = logaddexp(lse, L_R),   out' = e^{lse - lse'} out + e^{L_R - lse'} V_R.

Estimators (:data:`REMAINDERS`; ``a = scale * q``, tile of ``c`` keys, mean key ``mu``, mean value ``vbar``):

* ``none``: nothing (sparse-only).
* ``pooled``: ``L = log c + a.mu`` (Jensen: a lower bound of the true log mass), ``V = vbar``. Exact when the
  keys of a tile are identical. ``pooled-sub4``: the same on four sub-tiles per tile.
* ``gaussian``: the conditional-Gaussian / log-normal estimate of the paper applied to tiles, with the FULL
  per-tile key covariance ``Sigma`` and key-value cross covariance ``C = Cov(v, k)``:
  ``L = log c + a.mu + 0.5 a^T Sigma a`` (the cumulant expansion of log E e^{a.k} to second order: exact for
  Gaussian keys) and ``V = vbar + C a`` (E[e^{a.k} v] / E[e^{a.k}] for jointly Gaussian (k, v)). Both are clamped
  by certified bounds: ``L <= log c + a.mu + |a| rho_k`` (``rho_k = max_j |k_j - mu|``) and
  ``|V - vbar| <= rho_v`` (the tilted mean lies in the convex hull of the tile's values).
  ``gaussian-r4``: ``Sigma`` replaced by its top-4 eigenpairs per tile and ``C`` by ``C U U^T`` on that basis.
* ``gaussian-rem`` (``-r4``): the Gaussian estimate with the random-energy-model tail. A tile holds c keys, not a
  distribution: once the score spread ``sigma = sqrt(a^T Sigma a)`` passes ``sigma_c = sqrt(2 log c)`` the sum
  is dominated by its largest terms (Derrida's freezing transition), so ``L = a.mu + sigma sigma_c`` there
  (continuous at sigma_c) and the tilt of the value correction is scaled by ``sigma_c / sigma``.
* ``hybrid4`` / ``hybrid8`` / ``hybrid4-rem``: 4 (8) keys of every dropped tile computed exactly for every query,
  the rest estimated (pooled, or gaussian-rem-r4). The exact keys are chosen once per key head and tile by
  their summed softmax mass over the last 64 queries (every query head of the group), as MInference scores its
  vertical lines; their scoring is counted in the cost.
* ``pooled-cal`` / ``gaussian-cal`` / ``hybrid8-cal``: the base estimate plus a per-head log-mass offset fitted in
  closed form on 64 exact rows (their scores counted in the cost).

Measured on a trained causal LM (``benchmarks/NOTES-remainder.md``): pooled and hybrid lower the output error
(hybrid8 by about a third), the Gaussian variants and the calibration make it worse, and none halves it.

:func:`remainder_bounds` gives the certified interval of each row's dropped log mass (Jensen below, the radius
bound above). :func:`remainder_cost` counts the multiply-adds as a fraction of dense causal attention (QK^T and
PV over the causal tiles: the denominator of tile density). :func:`masked_out_lse` is the dense float reference
of the exact sparse part (O(N^2): tests and CPU benchmarks).

Only causal, unpermuted tile masks are supported: a ``keep`` that drops a diagonal tile is refused
(``ConfigError``); entries above the diagonal are ignored.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
from torch import Tensor

from attnlab.errors import ConfigError, ShapeError
from attnlab.registry import Registry

__all__ = [
    "REMAINDERS",
    "RemainderEstimator",
    "NoRemainder",
    "PooledRemainder",
    "GaussianRemainder",
    "HybridRemainder",
    "CalibratedRemainder",
    "add_remainder",
    "estimate_remainder",
    "merge_remainder",
    "remainder_bounds",
    "remainder_cost",
    "masked_out_lse",
    "dropped_tiles",
]

#: name -> remainder estimator (``REMAINDERS.get(name)``); ``--remainder`` selects one.
REMAINDERS: Registry = Registry("remainder estimator", "--remainder")

_CHUNK_ELEMS = 1 << 24  # bound on the (rows x sub-tiles x d) intermediates of one query chunk


# -- tile statistics ------------------------------------------------------------------------------------------
def _tile_stats(k: Tensor, v: Tensor, size: int, second: bool, dt: torch.dtype, span: int,
                weight: Optional[Tensor] = None) -> dict[str, Tensor]:
    """Per (sub-)tile of ``size`` keys: count (B, Hkv, nt), mean key/value, radii; with ``second`` the key
    covariance and the value-key cross covariance (population, divided by the count). k, v: (B, Hkv, N, d),
    zero-padded to a multiple of ``span`` (the tile size): sub-tiles past N have count 0. ``weight`` (B, Hkv, N)
    in {0, 1} leaves keys out (the exactly computed keys of :class:`HybridRemainder`)."""
    B, Hk, N, d = k.shape
    dv = v.shape[-1]
    nt = -(-N // span) * (span // size)
    pad = nt * size - N
    kk = torch.nn.functional.pad(k.to(dt), (0, 0, 0, pad)).view(B, Hk, nt, size, d)
    vv = torch.nn.functional.pad(v.to(dt), (0, 0, 0, pad)).view(B, Hk, nt, size, dv)
    valid = (torch.arange(nt * size, device=k.device) < N).to(dt).view(1, 1, nt, size, 1)
    if weight is not None:
        valid = valid * torch.nn.functional.pad(weight.to(dt), (0, pad)).view(B, Hk, nt, size, 1)
    valid = valid.expand(B, Hk, nt, size, 1)
    cnt = valid.sum(3).squeeze(-1)  # (B, Hk, nt)
    c = cnt.clamp_min(1).unsqueeze(-1)
    mu = (kk * valid).sum(3) / c
    vbar = (vv * valid).sum(3) / c
    dk = (kk - mu.unsqueeze(3)) * valid
    dvv = (vv - vbar.unsqueeze(3)) * valid
    st = {"count": cnt, "mu": mu, "vbar": vbar, "rho_k": dk.norm(dim=-1).amax(-1), "rho_v": dvv.norm(dim=-1).amax(-1)}
    if second:
        st["cov_k"] = torch.einsum("bhtsd,bhtse->bhtde", dk, dk) / c.unsqueeze(-1)
        st["cov_vk"] = torch.einsum("bhtsd,bhtse->bhtde", dvv, dk) / c.unsqueeze(-1)  # (dv, d)
    return st


def _bc(x: Tensor) -> Tensor:
    """(B, Hk, nt, ...) tile statistic -> broadcastable against (B, Hk, g, n, nt, ...)."""
    return x.unsqueeze(2).unsqueeze(2)


class RemainderEstimator:
    """Base: per-(sub)tile statistics once per key head, then per query chunk the log masses (B, Hk, g, n, nt)
    and the weighted values (B, Hk, g, n, dv). ``sub`` sub-tiles per tile carry their own statistics."""

    sub: int = 1
    second_order: bool = False

    def stats(self, k: Tensor, v: Tensor, block: int, dt: torch.dtype, q: Optional[Tensor] = None,
              scale: float = 1.0, weight: Optional[Tensor] = None) -> dict[str, Tensor]:
        """Statistics of every sub-tile (block // sub keys); ``q`` (B, Hk, g, N, d) for estimators that probe."""
        return _tile_stats(k, v, block // self.sub, self.second_order, dt, block, weight)

    def log_mass(self, a: Tensor, st: dict[str, Tensor]) -> tuple[Tensor, Any]:
        """(log mass (B, Hk, g, n, nt), state for :meth:`values`) of scaled queries ``a`` (B, Hk, g, n, d)."""
        raise NotImplementedError

    def values(self, w: Tensor, a: Tensor, st: dict[str, Tensor], state: Any) -> Tensor:
        """sum_t w_t V_t (B, Hk, g, n, dv) for weights ``w`` (B, Hk, g, n, nt)."""
        raise NotImplementedError

    def pair_macs(self, d: int, dv: int) -> float:
        """Multiply-adds per (query, dropped sub-tile)."""
        raise NotImplementedError

    def tile_macs(self, size: int, d: int, dv: int) -> float:
        """Multiply-adds of one sub-tile's statistics (per key head)."""
        raise NotImplementedError

    def seq_macs(self, n: int, d: int, group: int) -> float:
        """Multiply-adds per key head and sequence outside the tiles (probing), ``group`` query heads per key head."""
        return 0.0

    def fit(self, a: Tensor, k: Tensor, keep: Tensor, block: int, st: dict[str, Tensor]) -> dict[str, Tensor]:
        """Fit per-sequence parameters from scaled queries ``a`` (B, Hk, g, N, d) and ``keep`` (B, H, nq, nk)
        (default: nothing)."""
        return st

    def describe(self) -> str:
        """One line for tables."""
        return type(self).__name__


@dataclass(frozen=True)
class NoRemainder(RemainderEstimator):
    """Sparse-only: the dropped mass is thrown away."""

    def describe(self) -> str:
        return "none (sparse only)"


def _pooled_mass(a: Tensor, st: dict[str, Tensor]) -> Tensor:
    s = torch.einsum("bkgnd,bktd->bkgnt", a, st["mu"])
    c = _bc(st["count"])
    return s + torch.where(c > 0, c.clamp_min(1).log(), torch.full_like(c, -math.inf))


@dataclass(frozen=True)
class PooledRemainder(RemainderEstimator):
    """Mean key and mean value per (sub-)tile: L = log c + a.mu, V = vbar."""

    sub: int = 1

    def log_mass(self, a: Tensor, st: dict[str, Tensor]) -> tuple[Tensor, Any]:
        return _pooled_mass(a, st), None

    def values(self, w: Tensor, a: Tensor, st: dict[str, Tensor], state: Any) -> Tensor:
        return torch.einsum("bkgnt,bktd->bkgnd", w, st["vbar"])

    def pair_macs(self, d: int, dv: int) -> float:
        return float(d + dv)  # the score against the mean key + the weighted mean value

    def tile_macs(self, size: int, d: int, dv: int) -> float:
        return float(size * (d + dv))

    def describe(self) -> str:
        return f"pooled ({self.sub} sub-tile{'s' if self.sub > 1 else ''} per tile)"


@dataclass(frozen=True)
class GaussianRemainder(RemainderEstimator):
    """Conditional-Gaussian tile estimate (see the module docstring). ``rank``: eigenpairs of the key covariance
    kept per tile (None: all d, the full covariance); ``clamp``: apply the certified bounds; ``value_correction``:
    add C a to the mean value."""

    sub: int = 1
    rank: Optional[int] = None
    clamp: bool = True
    value_correction: bool = True
    tail: str = "gaussian"
    second_order: bool = True

    def __post_init__(self) -> None:
        if self.tail not in ("gaussian", "rem"):
            raise ConfigError(f"tail must be 'gaussian' or 'rem', got {self.tail!r}")

    def stats(self, k: Tensor, v: Tensor, block: int, dt: torch.dtype, q: Optional[Tensor] = None,
              scale: float = 1.0, weight: Optional[Tensor] = None) -> dict[str, Tensor]:
        st = super().stats(k, v, block, dt, q, scale, weight)
        d = k.shape[-1]
        r = d if self.rank is None else min(self.rank, d)
        lam, U = torch.linalg.eigh(st["cov_k"])  # ascending
        lam, U = lam[..., d - r:].clamp_min(0), U[..., d - r:]  # (.., nt, r), (.., nt, d, r)
        st["lam"], st["U"] = lam, U
        st["P"] = st["cov_vk"] @ U  # (.., nt, dv, r): C U
        return st

    def log_mass(self, a: Tensor, st: dict[str, Tensor]) -> tuple[Tensor, Any]:
        L0 = _pooled_mass(a, st)
        z = torch.einsum("bkgnd,bktdr->bkgntr", a, st["U"])  # a in each tile's eigenbasis
        var = (z * z * _bc(st["lam"])).sum(-1)  # score variance a^T Sigma a in the tile
        quad = 0.5 * var
        if self.tail == "rem":  # random-energy-model freezing: past sigma_c = sqrt(2 log c) the max dominates
            sig = var.clamp_min(0).sqrt()
            sig_c = (2 * _bc(st["count"]).clamp_min(1).log()).sqrt()
            frozen = sig > sig_c
            quad = torch.where(frozen, sig * sig_c - sig_c ** 2 / 2, quad)  # log c + that = sigma sigma_c
            z = z * torch.where(frozen, sig_c / sig.clamp_min(1e-300), torch.ones_like(sig)).unsqueeze(-1)
        if self.clamp:
            quad = torch.minimum(quad, a.norm(dim=-1, keepdim=True) * _bc(st["rho_k"]))
        return L0 + quad, z

    def values(self, w: Tensor, a: Tensor, st: dict[str, Tensor], state: Any) -> Tensor:
        base = torch.einsum("bkgnt,bktd->bkgnd", w, st["vbar"])
        if not self.value_correction:
            return base
        corr = torch.einsum("bkgntr,bktdr->bkgntd", state, st["P"])  # C a per tile
        if self.clamp:
            nrm = corr.norm(dim=-1)
            cap = _bc(st["rho_v"])
            corr = corr * torch.where(nrm > cap, cap / nrm.clamp_min(1e-300), torch.ones_like(nrm)).unsqueeze(-1)
        return base + (w.unsqueeze(-1) * corr).sum(-2)

    def pair_macs(self, d: int, dv: int) -> float:
        r = d if self.rank is None else min(self.rank, d)
        # a.mu, the projection U^T a, the quadratic form, C U z, the weighted value and correction sums
        return float(d + d * r + r + dv * r + 2 * dv + (dv + 1 if self.clamp else 0))

    def tile_macs(self, size: int, d: int, dv: int) -> float:
        r = d if self.rank is None else min(self.rank, d)
        # means, the two covariances, the eigendecomposition (~d^3), C U
        return float(size * (d + dv) + size * d * (d + dv) + d ** 3 + dv * d * r)

    def describe(self) -> str:
        r = "full covariance" if self.rank is None else f"rank-{self.rank} covariance"
        return f"gaussian ({r}{', value correction' if self.value_correction else ''}" \
               f"{', REM-frozen tail' if self.tail == 'rem' else ''}{', clamped' if self.clamp else ''})"


@dataclass(frozen=True)
class HybridRemainder(RemainderEstimator):
    """``m`` exact keys per dropped tile + the ``rest`` estimator over the tile's other keys. The exact keys are
    chosen once per key head and tile (shared by every query): by their summed softmax mass over ``probe`` probe
    queries (the sequence's last queries, every query head of the group; ``select='probe'``, as MInference
    scores its vertical lines) or by key norm (``'norm'``, free)."""

    m: int = 4
    probe: int = 64
    select: str = "probe"
    rest: RemainderEstimator = PooledRemainder()

    def __post_init__(self) -> None:
        if self.select not in ("probe", "norm"):
            raise ConfigError(f"select must be 'probe' or 'norm', got {self.select!r}")
        if self.rest.sub != 1 or self.m < 1:
            raise ConfigError("hybrid remainder: the rest estimator must use whole tiles and m >= 1")

    def _columns(self, k: Tensor, a: Optional[Tensor]) -> Tensor:
        """Importance of every key (B, Hk, N)."""
        if self.select == "norm" or a is None:
            return k.norm(dim=-1)
        N = k.shape[2]
        P = min(self.probe, N)
        s = torch.einsum("bkgpd,bknd->bkgpn", a[:, :, :, N - P:], k.to(a.dtype))
        pos = torch.arange(N - P, N, device=k.device).view(-1, 1)
        s = s.masked_fill(torch.arange(N, device=k.device).view(1, -1) > pos, -math.inf)
        return torch.softmax(s, -1).sum((2, 3))

    def stats(self, k: Tensor, v: Tensor, block: int, dt: torch.dtype, q: Optional[Tensor] = None,
              scale: float = 1.0, weight: Optional[Tensor] = None) -> dict[str, Tensor]:
        B, Hk, N, d = k.shape
        nt = -(-N // block)
        m = min(self.m, block)
        col = torch.nn.functional.pad(self._columns(k, q).to(dt), (0, nt * block - N), value=-math.inf)
        top = col.view(B, Hk, nt, block).topk(m, dim=-1)
        idx = top.indices + (torch.arange(nt, device=k.device) * block).view(1, 1, nt, 1)
        ok = (idx < N) & torch.isfinite(top.values)
        idx = idx.clamp_max(N - 1)
        flat = idx.reshape(B, Hk, nt * m)
        kE = torch.gather(k.to(dt), 2, flat.unsqueeze(-1).expand(-1, -1, -1, d)).view(B, Hk, nt, m, d)
        vE = torch.gather(v.to(dt), 2, flat.unsqueeze(-1).expand(-1, -1, -1, v.shape[-1])).view(B, Hk, nt, m, -1)
        w = torch.ones(B, Hk, N, dtype=dt, device=k.device)
        w.scatter_(2, flat, (~ok).to(dt).reshape(B, Hk, nt * m))  # exact keys leave the rest's statistics
        st = self.rest.stats(k, v, block, dt, q, scale, w if weight is None else w * weight)
        st.update({"kE": kE, "vE": vE, "okE": ok})
        return st

    def log_mass(self, a: Tensor, st: dict[str, Tensor]) -> tuple[Tensor, Any]:
        L_rest, rest_state = self.rest.log_mass(a, st)
        sE = torch.einsum("bkgnd,bktmd->bkgntm", a, st["kE"]).masked_fill(~_bc(st["okE"]), -math.inf)
        L = torch.logaddexp(L_rest, torch.logsumexp(sE, -1))
        return L, (rest_state, L_rest, sE, L)

    def values(self, w: Tensor, a: Tensor, st: dict[str, Tensor], state: Any) -> Tensor:
        rest_state, L_rest, sE, L = state
        Ls = torch.where(w > 0, L, torch.zeros_like(L))
        w_rest = torch.where(w > 0, w * torch.exp(L_rest - Ls), torch.zeros_like(w))
        wE = torch.where((w > 0).unsqueeze(-1), w.unsqueeze(-1) * torch.exp(sE - Ls.unsqueeze(-1)), torch.zeros_like(sE))
        return self.rest.values(w_rest, a, st, rest_state) + torch.einsum("bkgntm,bktmd->bkgnd", wE, st["vE"])

    def pair_macs(self, d: int, dv: int) -> float:
        return self.rest.pair_macs(d, dv) + self.m * (d + dv)

    def tile_macs(self, size: int, d: int, dv: int) -> float:
        return self.rest.tile_macs(size, d, dv) + size  # + the top-m selection

    def seq_macs(self, n: int, d: int, group: int) -> float:
        return float(group * min(self.probe, n) * n * (d + 1)) if self.select == "probe" else float(n * d)

    def describe(self) -> str:
        return f"hybrid ({self.m} exact keys per tile by {self.select}; rest: {self.rest.describe()})"


@dataclass(frozen=True)
class CalibratedRemainder(RemainderEstimator):
    """``base`` with a per-head log-mass offset beta fitted on ``rows`` exact query rows of the sequence (evenly
    spaced among the rows that drop tiles): beta = log sum_i e^{L_i - lse_i} - log sum_i e^{Lhat_i - lse_i} makes
    the estimated dropped mass, relative to each row's kept mass, match the exact one on those rows. Corrects
    the systematic bias of the tile estimates (Jensen's underestimate for pooled, the Gaussian's overestimate);
    the exact rows cost ``rows * N * (d + 1)`` per query head."""

    base: RemainderEstimator = PooledRemainder()
    rows: int = 64

    @property
    def sub(self) -> int:  # type: ignore[override]
        return self.base.sub

    def stats(self, k: Tensor, v: Tensor, block: int, dt: torch.dtype, q: Optional[Tensor] = None,
              scale: float = 1.0, weight: Optional[Tensor] = None) -> dict[str, Tensor]:
        return self.base.stats(k, v, block, dt, q, scale, weight)

    def fit(self, a: Tensor, k: Tensor, keep: Tensor, block: int, st: dict[str, Tensor]) -> dict[str, Tensor]:
        st = self.base.fit(a, k, keep, block, st)
        B, Hk, g, N, d = a.shape
        nt = keep.shape[-1]
        if N <= block:
            return {**st, "beta": torch.zeros(B, Hk, g, 1, 1, dtype=a.dtype, device=a.device)}
        rows = torch.linspace(block, N - 1, min(self.rows, N - block), device=a.device).round().long().unique()
        ar = a[:, :, :, rows]
        tiles = rows // block
        s = torch.einsum("bkgrd,bknd->bkgrn", ar, k.to(a.dtype))
        col_tile = torch.arange(N, device=a.device) // block
        kb = keep.expand(B, -1, -1, -1).reshape(B, Hk, g, nt, nt)[:, :, :, tiles]  # (B, Hk, g, R, nt)
        kept_tok = torch.gather(kb, -1, col_tile.view(1, 1, 1, 1, N).expand(B, Hk, g, rows.numel(), N))
        causal = torch.arange(N, device=a.device).view(1, -1) <= rows.view(-1, 1)
        lse = torch.logsumexp(s.masked_fill(~(kept_tok & causal), -math.inf), -1)
        drop_tok = ~kept_tok & (col_tile.view(1, -1) < tiles.view(-1, 1))
        L_true = torch.logsumexp(s.masked_fill(~drop_tok, -math.inf), -1)
        dt_ = dropped_tiles(keep).expand(B, -1, -1, -1).reshape(B, Hk, g, nt, nt)[:, :, :, tiles]
        L, _ = self.base.log_mass(ar, st)
        L_hat = torch.logsumexp(L.masked_fill(~dt_.repeat_interleave(self.sub, -1), -math.inf), -1)
        ok = torch.isfinite(L_true) & torch.isfinite(L_hat)
        num = torch.logsumexp((L_true - lse).masked_fill(~ok, -math.inf), -1)
        den = torch.logsumexp((L_hat - lse).masked_fill(~ok, -math.inf), -1)
        beta = torch.where(ok.any(-1), num - den, torch.zeros_like(num))
        return {**st, "beta": beta.view(B, Hk, g, 1, 1)}

    def log_mass(self, a: Tensor, st: dict[str, Tensor]) -> tuple[Tensor, Any]:
        L, state = self.base.log_mass(a, st)
        return L + st["beta"], state

    def values(self, w: Tensor, a: Tensor, st: dict[str, Tensor], state: Any) -> Tensor:
        return self.base.values(w, a, st, state)

    def pair_macs(self, d: int, dv: int) -> float:
        return self.base.pair_macs(d, dv)

    def tile_macs(self, size: int, d: int, dv: int) -> float:
        return self.base.tile_macs(size, d, dv)

    def seq_macs(self, n: int, d: int, group: int) -> float:
        return self.base.seq_macs(n, d, group) + float(group * self.rows * n * (d + 1))

    def describe(self) -> str:
        return f"{self.base.describe()}, log-mass calibrated on {self.rows} exact rows"


REMAINDERS.add("none", NoRemainder(), help="sparse only: the dropped tiles' mass is thrown away")
REMAINDERS.add("pooled", PooledRemainder(), help="per dropped tile: mean key score, tile mean value")
REMAINDERS.add("pooled-sub4", PooledRemainder(sub=4), help="pooled on 4 sub-tiles per dropped tile")
REMAINDERS.add("gaussian", GaussianRemainder(), help="per dropped tile: log-normal mass with the full key "
               "covariance, value corrected by the key-value cross covariance (bounds-clamped)")
REMAINDERS.add("gaussian-r4", GaussianRemainder(rank=4), help="gaussian with the top-4 covariance eigenpairs per tile")
REMAINDERS.add("gaussian-rem", GaussianRemainder(tail="rem"), help="gaussian with the random-energy-model tail: "
               "past score spread sqrt(2 log c) the tile's log mass is sigma*sqrt(2 log c) and the tilt is capped")
REMAINDERS.add("gaussian-rem-r4", GaussianRemainder(rank=4, tail="rem"), help="gaussian-rem, top-4 eigenpairs")
REMAINDERS.add("hybrid4", HybridRemainder(m=4), help="4 exact keys per dropped tile (probe-selected) + pooled rest")
REMAINDERS.add("hybrid8", HybridRemainder(m=8), help="8 exact keys per dropped tile (probe-selected) + pooled rest")
REMAINDERS.add("pooled-cal", CalibratedRemainder(PooledRemainder()), help="pooled, log mass calibrated on 64 exact rows")
REMAINDERS.add("gaussian-cal", CalibratedRemainder(GaussianRemainder()), help="gaussian, log mass calibrated on 64 exact rows")
REMAINDERS.add("hybrid8-cal", CalibratedRemainder(HybridRemainder(m=8)), help="hybrid8, log mass calibrated on 64 exact rows")
REMAINDERS.add("hybrid4-rem", HybridRemainder(m=4, rest=GaussianRemainder(rank=4, tail="rem")),
               help="4 exact keys per dropped tile + gaussian-rem-r4 rest")


# -- checks --------------------------------------------------------------------------------------------------
def _resolve(method: Union[str, RemainderEstimator]) -> RemainderEstimator:
    if isinstance(method, RemainderEstimator):
        return method
    if not isinstance(method, str):
        raise ConfigError(f"method must be a remainder name ({', '.join(REMAINDERS.names())}), got {method!r}")
    return REMAINDERS.get(method)


def _check(q: Tensor, k: Tensor, v: Tensor, keep: Tensor, block: int) -> tuple[int, int]:
    """Shapes and dtypes (ShapeError / ConfigError naming the argument) -> (group size, tiles per side)."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, Tensor) or x.dim() != 4:
            raise ShapeError(f"{name} must be a (B, H, N, d) tensor, got {getattr(x, 'shape', type(x))}")
        if not x.is_floating_point():
            raise ConfigError(f"{name} must be a floating-point tensor, got {x.dtype}")
    B, H, N, d = q.shape
    if k.shape[0] != B or k.shape[2] != N or k.shape[3] != d:
        raise ShapeError(f"k must be (B={B}, Hkv, N={N}, d={d}), got {tuple(k.shape)}")
    if v.shape[:3] != k.shape[:3]:
        raise ShapeError(f"v must be (B, Hkv, N) = {tuple(k.shape[:3])} in its first three dims, got {tuple(v.shape)}")
    if k.shape[1] < 1 or H % k.shape[1]:
        raise ShapeError(f"k: query heads H={H} must be a multiple of the key heads Hkv={k.shape[1]}")
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise ConfigError(f"block must be a positive int tile size, got {block!r}")
    nt = -(-N // block)
    if not isinstance(keep, Tensor) or keep.dtype != torch.bool:
        raise ConfigError(f"keep must be a bool tile mask, got {getattr(keep, 'dtype', type(keep))}")
    if keep.dim() != 4 or keep.shape[0] not in (1, B) or tuple(keep.shape[1:]) != (H, nt, nt):
        raise ShapeError(f"keep must be (B={B} or 1, H={H}, nq={nt}, nk={nt}) for N={N}, block={block}; "
                         f"got {tuple(keep.shape)}")
    if not bool(keep.diagonal(dim1=-2, dim2=-1).all()):
        raise ConfigError("keep drops a diagonal tile: causal prefill must keep every diagonal tile (its rows' "
                          "exact part would be empty and the tile is only partly visible)")
    return H // k.shape[1], nt


def dropped_tiles(keep: Tensor) -> Tensor:
    """Dropped causal tiles: not kept and strictly below the diagonal (B|1, H, nq, nk) bool."""
    nt = keep.shape[-1]
    low = torch.ones(nt, nt, dtype=torch.bool, device=keep.device).tril_(-1)
    return ~keep & low


def _work_dtype(*xs: Tensor) -> torch.dtype:
    return torch.float64 if any(x.dtype == torch.float64 for x in xs) else torch.float32


# -- the estimate and the merge ------------------------------------------------------------------------------
@torch.no_grad()
def estimate_remainder(q: Tensor, k: Tensor, v: Tensor, keep: Tensor, block: int,
                       method: Union[str, RemainderEstimator], *, scale: Optional[float] = None
                       ) -> tuple[Tensor, Tensor]:
    """(L_R (B, H, N): estimated natural-log mass of each row's dropped tiles (-inf: none dropped),
    V_R (B, H, N, dv): the estimated mean value over them (0 where none)) in float32 (float64 inputs: float64)."""
    est = _resolve(method)
    g, nt = _check(q, k, v, keep, block)
    B, H, N, d = q.shape
    Hk, dv = k.shape[1], v.shape[-1]
    dt = _work_dtype(q, k, v)
    L_R = torch.full((B, H, N), -math.inf, dtype=dt, device=q.device)
    V_R = torch.zeros(B, H, N, dv, dtype=dt, device=q.device)
    drop = dropped_tiles(keep)
    if isinstance(est, NoRemainder) or not bool(drop.any()):
        return L_R, V_R
    if block % est.sub:
        raise ConfigError(f"block {block} must be a multiple of the method's {est.sub} sub-tiles")
    scale = d ** -0.5 if scale is None else float(scale)
    a_all = (q.to(dt) * scale).view(B, Hk, g, N, d)
    st = est.fit(a_all, k.to(dt), keep, block, est.stats(k, v, block, dt, a_all, 1.0))
    nts = st["mu"].shape[2]  # sub-tiles
    drop = drop.expand(B, H, nt, nt)
    per_tile = max(1, B * H * block * nts * max(d, dv, 1))
    tiles_per_chunk = max(1, _CHUNK_ELEMS // per_tile)
    for i0 in range(1, nt, tiles_per_chunk):  # query tile 0 drops nothing
        i1 = min(nt, i0 + tiles_per_chunk)
        r0, r1 = i0 * block, min(N, i1 * block)
        m = drop[:, :, i0:i1].repeat_interleave(est.sub, dim=-1)  # (B, H, tiles, nts)
        m = m.repeat_interleave(block, dim=2)[:, :, : r1 - r0].view(B, Hk, g, r1 - r0, nts)
        if not bool(m.any()):
            continue
        a = a_all[:, :, :, r0:r1]
        L, state = est.log_mass(a, st)
        L = L.masked_fill(~m, -math.inf)
        lr = torch.logsumexp(L, dim=-1)  # (B, Hk, g, n)
        has = torch.isfinite(lr)
        w = torch.exp(L - torch.where(has, lr, torch.zeros_like(lr)).unsqueeze(-1))
        w = torch.where(m, w, torch.zeros_like(w))
        L_R[:, :, r0:r1] = lr.reshape(B, H, r1 - r0)
        V_R[:, :, r0:r1] = est.values(w, a, st, state).reshape(B, H, r1 - r0, dv)
    return L_R, V_R


def merge_remainder(out: Tensor, lse: Tensor, L_R: Tensor, V_R: Tensor) -> tuple[Tensor, Tensor]:
    """Joint softmax of the exact part (out, natural-log lse) and the remainder (L_R, V_R): (out', lse'), out' in
    ``out``'s dtype. Rows with L_R = -inf are returned unchanged."""
    dt = _work_dtype(out, lse, L_R)
    lse_d, L = lse.to(dt), L_R.to(dt)
    tot = torch.logaddexp(lse_d, L)
    has = torch.isfinite(L)
    a = torch.where(has, torch.exp(lse_d - tot), torch.ones_like(tot)).unsqueeze(-1)
    b = torch.where(has, torch.exp(L - tot), torch.zeros_like(tot)).unsqueeze(-1)
    merged = torch.where(has.unsqueeze(-1), a * out.to(dt) + b * V_R.to(dt), out.to(dt))
    return merged.to(out.dtype), torch.where(has, tot, lse_d).to(lse.dtype)


def add_remainder(q: Tensor, k: Tensor, v: Tensor, keep: Tensor, block: int, out: Tensor, lse: Tensor,
                  method: Union[str, RemainderEstimator], *, scale: Optional[float] = None) -> torch.Tensor:
    """The sparse output ``out`` (B, H, N, dv; exact over the kept tiles, normalised over kept pairs) with the
    dropped tiles' estimated attention added under the joint softmax normaliser (``lse`` (B, H, N): natural-log
    log-sum-exp of the kept scores). q (B, H, N, d); k, v (B, Hkv, N, d|dv), H % Hkv == 0; keep (B|1, H, nq,
    nk) bool with every diagonal tile kept; method: a :data:`REMAINDERS` name. Returns out's dtype."""
    _check(q, k, v, keep, block)
    B, H, N = q.shape[:3]
    dv = v.shape[-1]
    if not isinstance(out, Tensor) or tuple(out.shape) != (B, H, N, dv):
        raise ShapeError(f"out must be (B, H, N, dv) = {(B, H, N, dv)}, got {tuple(getattr(out, 'shape', ()))}")
    if not isinstance(lse, Tensor) or tuple(lse.shape) != (B, H, N):
        raise ShapeError(f"lse must be (B, H, N) = {(B, H, N)}, got {tuple(getattr(lse, 'shape', ()))}")
    if not out.is_floating_point() or not lse.is_floating_point():
        raise ConfigError(f"out and lse must be floating point, got {out.dtype}, {lse.dtype}")
    est = _resolve(method)
    if isinstance(est, NoRemainder):
        return out
    L_R, V_R = estimate_remainder(q, k, v, keep, block, est, scale=scale)
    return merge_remainder(out, lse, L_R, V_R)[0]


# -- bounds, cost, reference ---------------------------------------------------------------------------------
@torch.no_grad()
def remainder_bounds(q: Tensor, k: Tensor, keep: Tensor, block: int, *, scale: Optional[float] = None
                     ) -> tuple[Tensor, Tensor]:
    """Certified (lower, upper) natural-log mass of each row's dropped tiles (B, H, N): per tile, Jensen's
    ``log c + a.mu`` below and ``log c + a.mu + |a| rho_k`` above; -inf where nothing is dropped."""
    est = PooledRemainder()
    lo, _ = estimate_remainder(q, k, k, keep, block, est, scale=scale)
    g, nt = _check(q, k, k, keep, block)
    B, H, N, d = q.shape
    dt = _work_dtype(q, k)
    sc = d ** -0.5 if scale is None else float(scale)
    st = _tile_stats(k, k, block, False, dt, block)
    a = (q.to(dt) * sc).view(B, k.shape[1], g, N, d)
    L = _pooled_mass(a, st) + a.norm(dim=-1, keepdim=True) * _bc(st["rho_k"])
    m = dropped_tiles(keep).expand(B, H, nt, nt).repeat_interleave(block, dim=2)[:, :, :N]
    hi = torch.logsumexp(L.masked_fill(~m.view(B, k.shape[1], g, N, nt), -math.inf), dim=-1).view(B, H, N)
    return lo, hi


def remainder_cost(keep: Tensor, block: int, n: int, d: int, method: Union[str, RemainderEstimator], *,
                   dv: Optional[int] = None, n_kv_heads: Optional[int] = None) -> dict[str, float]:
    """Multiply-adds of the remainder over all batch rows and heads of ``keep`` (B|1, H, nq, nk), and its
    fraction of dense causal attention in the units of tile density (QK^T + PV over the nq(nq+1)/2 causal tiles:
    2 block^2 d per tile and head). Statistics are counted once per key head (``n_kv_heads``, default H)."""
    est = _resolve(method)
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise ConfigError(f"block must be a positive int tile size, got {block!r}")
    if n < 1 or d < 1:
        raise ConfigError(f"n and d must be >= 1, got n={n}, d={d}")
    dv = d if dv is None else dv
    Bk, H, nq, nk = keep.shape
    hk = H if n_kv_heads is None else n_kv_heads
    dense = float(Bk * H * nq * (nq + 1) / 2 * block * (block * d + block * dv))
    if isinstance(est, NoRemainder):
        return {"macs": 0.0, "pair_macs": 0.0, "stats_macs": 0.0, "dense_macs": dense, "fraction": 0.0}
    rows = torch.full((nq,), float(block), device=keep.device)
    rows[-1] = float(n - (nq - 1) * block)
    drop_per_qtile = dropped_tiles(keep).sum(-1).to(torch.float64)  # (Bk, H, nq)
    pairs = float((drop_per_qtile * rows.to(torch.float64)).sum()) * est.sub  # (query, dropped sub-tile)
    size = block // est.sub
    stats = Bk * hk * ((-(-n // size)) * est.tile_macs(size, d, dv) + est.seq_macs(n, d, H // hk)) if pairs > 0 else 0.0
    macs = pairs * est.pair_macs(d, dv) + stats
    return {"macs": macs, "pair_macs": pairs * est.pair_macs(d, dv), "stats_macs": float(stats),
            "dense_macs": dense, "fraction": macs / dense}


@torch.no_grad()
def masked_out_lse(q: Tensor, k: Tensor, v: Tensor, keep: Tensor, block: int, *, scale: Optional[float] = None,
                   dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor]:
    """Dense reference of the exact sparse part: (out (B, H, N, dv), natural-log lse (B, H, N)) over the causal
    pairs of the kept tiles, in ``dtype``. O(N^2) memory per head (one head at a time)."""
    g, nt = _check(q, k, v, keep, block)
    B, H, N, d = q.shape
    sc = d ** -0.5 if scale is None else float(scale)
    causal = torch.ones(N, N, dtype=torch.bool, device=q.device).tril_()
    out = torch.empty(B, H, N, v.shape[-1], dtype=dtype, device=q.device)
    lse = torch.empty(B, H, N, dtype=dtype, device=q.device)
    kb = keep.expand(B, H, nt, nt)
    for h in range(H):
        allowed = kb[:, h].repeat_interleave(block, 1).repeat_interleave(block, 2)[:, :N, :N] & causal
        s = (q[:, h].to(dtype) @ k[:, h // g].to(dtype).transpose(-1, -2)) * sc
        s = s.masked_fill(~allowed, -math.inf)
        lse[:, h] = torch.logsumexp(s, -1)
        out[:, h] = torch.softmax(s, -1) @ v[:, h // g].to(dtype)
    return out, lse
