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
from typing import Optional, Union

import torch
from torch import Tensor

from attnlab.errors import ConfigError, ShapeError
from attnlab.blocksparse.remainder_estimators import (  # noqa: F401  (public names re-exported here)
    _CHUNK_ELEMS,
    REMAINDERS,
    CalibratedRemainder,
    GaussianRemainder,
    HybridRemainder,
    NoRemainder,
    PooledRemainder,
    RemainderEstimator,
    _bc,
    _pooled_mass,
    _tile_stats,
    dropped_tiles,
)

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
