"""The remainder estimators of :mod:`attnlab.blocksparse.remainder` (registry :data:`REMAINDERS`): per dropped
(sub-)tile a log mass and a value from per-tile key/value statistics (see that module's docstring for the maths)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor

from attnlab.errors import ConfigError
from attnlab.registry import Registry

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


def dropped_tiles(keep: Tensor) -> Tensor:
    """Dropped causal tiles: not kept and strictly below the diagonal (B|1, H, nq, nk) bool."""
    nt = keep.shape[-1]
    low = torch.ones(nt, nt, dtype=torch.bool, device=keep.device).tril_(-1)
    return ~keep & low
