"""Causal rows of long windows (:mod:`.long`'s first half): q/k capture, scores a chunk of rows at a time, prefix
key means (exact causal row means), row sampling and the row spectrum of the sampled rows (k90/k95/k99 from their
R x R Gram, never an N x N array). :mod:`.long` re-exports every name."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..attention import AttentionCall
from ..errors import ModelError

LEVELS = (0.9, 0.95, 0.99)

__all__ = ["LEVELS", "Captured", "capture_qk", "causal_chunk", "prefix_key_mean", "sample_rows", "rank_at",
           "head_spectrum", "spectrum_summary"]


# ------------------------------------------------------------------------------------------------------------
# Capture
# ------------------------------------------------------------------------------------------------------------


@dataclass
class Captured:
    """q and k (B, H, N, d) of every chosen layer of some windows, rotary applied, GQA expanded."""

    q: dict[int, torch.Tensor]
    k: dict[int, torch.Tensor]
    scaling: float

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """(B, H, N, d)."""
        return tuple(next(iter(self.q.values())).shape)  # type: ignore[return-value]


def _check_causal(call: AttentionCall) -> None:
    if call.bias is not None or call.softcap:
        raise ModelError("the long-context path supports plain causal scores only (no additive bias or softcap)")
    if call.valid is None:
        return
    n = call.valid.shape[-1]
    rows = torch.unique(torch.linspace(0, n - 1, min(n, 17)).long()).to(call.valid.device)
    want = torch.arange(n, device=rows.device).unsqueeze(0) <= rows.unsqueeze(1)  # (r, N)
    if not bool((call.valid[:, 0, rows] == want).all()):
        raise ModelError("the long-context path needs a causal mask without padding (rows i see keys 0..i)")


def capture_qk(model, windows: torch.Tensor, layers: list[int], device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32, batch_size: int = 1) -> Captured:
    """Run ``windows`` through the causal model and keep q and k of ``layers`` (on ``device``, in ``dtype``)."""
    from ..capture.run import stream_attention

    qs: dict[int, list] = {l: [] for l in layers}
    ks: dict[int, list] = {l: [] for l in layers}
    scal: list[float] = []

    def sink(call: AttentionCall) -> None:
        if call.layer not in qs:
            return
        _check_causal(call)
        qs[call.layer].append(call.query.detach().to(device, dtype))
        ks[call.layer].append(call.key.detach().to(device, dtype))
        scal.append(call.scaling)

    with torch.no_grad():
        stream_attention(model, windows, sink, layers, batch_size, desc="capture q/k", show_progress=False)
    return Captured({l: torch.cat(v) for l, v in qs.items()}, {l: torch.cat(v) for l, v in ks.items()}, scal[0])


def causal_chunk(q: torch.Tensor, k: torch.Tensor, rows: torch.Tensor, scaling: float) -> torch.Tensor:
    """Scores (B, c, N) of query positions ``rows`` against every key, -inf for keys after the query."""
    s = (q[:, rows] @ k.transpose(-1, -2)) * scaling
    after = torch.arange(k.shape[-2], device=k.device).unsqueeze(0) > rows.unsqueeze(1)  # (c, N)
    return s.masked_fill(after, float("-inf"))


def prefix_key_mean(k: torch.Tensor) -> torch.Tensor:
    """Mean of keys 0..i for every i: (B, N, d) (row means of causal scores are q_i . this * scaling)."""
    cnt = torch.arange(1, k.shape[-2] + 1, device=k.device, dtype=k.dtype).unsqueeze(-1)
    return k.cumsum(-2) / cnt


# ------------------------------------------------------------------------------------------------------------
# Row spectrum
# ------------------------------------------------------------------------------------------------------------


def sample_rows(n: int, count: int, n_windows: int, seed: int) -> list[torch.Tensor]:
    """``count`` query positions spread over ``n_windows`` windows (all rows when count >= n * n_windows)."""
    per = [count // n_windows + (1 if w < count % n_windows else 0) for w in range(n_windows)]
    g = torch.Generator().manual_seed(seed)
    out = []
    for m in per:
        out.append(torch.arange(n) if m >= n else torch.randperm(n, generator=g)[:m].sort().values)
    return out


def rank_at(evals: torch.Tensor, level: float) -> int:
    """Smallest k whose top-k eigenvalues (descending) explain ``level`` of their sum."""
    curve = torch.cumsum(evals.double(), 0) / evals.double().sum().clamp_min(1e-300)
    return int((curve < level - 1e-12).sum()) + 1


def head_spectrum(q: torch.Tensor, k: torch.Tensor, rows: list[torch.Tensor], scaling: float,
                  key_chunk: int = 4096) -> torch.Tensor:
    """Eigenvalues (descending) of the covariance of the sampled causal rows of one head, centred over their valid
    keys; q, k (B, N, d). The R x R Gram of the column-centred rows is built one R x kc tile at a time."""
    n = k.shape[-2]
    kbar = prefix_key_mean(k)
    dev = q.device
    parts = [(w, r.to(dev)) for w, r in enumerate(rows) if len(r)]
    qs = [q[w, r] for w, r in parts]  # (R_w, d) per window
    rmean = [(q[w, r] * kbar[w, r]).sum(-1, keepdim=True) * scaling for w, r in parts]  # exact row means
    big = sum(len(r) for _, r in parts)
    gram = torch.zeros(big, big, dtype=q.dtype, device=dev)
    for a in range(0, n, key_chunk):
        cols = torch.arange(a, min(n, a + key_chunk), device=dev)
        tiles = []
        for (w, r), qw, mw in zip(parts, qs, rmean):
            s = (qw @ k[w, a:a + key_chunk].T) * scaling  # (R_w, kc)
            ok = cols.unsqueeze(0) <= r.unsqueeze(1)
            tiles.append(torch.where(ok, s - mw, torch.zeros_like(s)))  # centred over valid keys, masked 0
        x = torch.cat(tiles)  # (R, kc)
        x = x - x.mean(0, keepdim=True)  # column-centred over the sampled rows
        gram += x @ x.T
        del tiles, x
    evals = torch.linalg.eigvalsh(gram / max(big - 1, 1))
    return evals.flip(0).clamp_min(0)


def spectrum_summary(evals: torch.Tensor, n_rows: int) -> dict[str, Any]:
    """k90/k95/k99 with a ``saturated`` flag when a level needs at least half of the sampled rows."""
    out: dict[str, Any] = {"rows": n_rows, "trace": float(evals.sum())}
    for lv in LEVELS:
        kk = rank_at(evals, lv)
        out[f"k{round(lv * 100)}"] = kk
        out[f"k{round(lv * 100)}_saturated"] = kk >= n_rows / 2
    return out
