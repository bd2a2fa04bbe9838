"""The stream sinks of a reconstruction fit: :class:`FitCollector` (row sums, row outer products and query / key
moments per (layer, head), a chunk of query rows at a time) and :class:`ResidualCollector` (statistics of a
fitted proxy's residual rows). :mod:`.fit` turns their sums into a :class:`~.fit.ReconstructionFit`."""

from __future__ import annotations

from typing import Any, Optional

import torch

from ..attention import AttentionCall
from ..errors import ConfigError, ShapeError
from ..spectral.stats import StreamingCovariance, row_centre

__all__ = ["FitCollector", "ProxySpec", "ResidualCollector", "residual_prefix"]


class FitCollector:
    """Sink for ``stream_attention``: accumulates row sums per query position, row outer products and
    query / within-sequence-centred key second moments for every chosen (layer, head).

    Scores are formed ``chunk_rows`` query rows at a time: besides the statistics themselves (``sx`` per query
    position and ``sxx``, ``2 * 8 N^2`` bytes per head, the paper's sufficient statistics) the collector holds one
    chunk, ``B * h * chunk_rows * N`` float64 values (h = chosen heads), never ``B * h * N^2``."""

    def __init__(self, layers: list[int], heads: list[int], seq_len: int, d_head: Optional[int] = None,
                 chunk_rows: int = 512):
        if chunk_rows < 1:
            raise ConfigError(f"chunk_rows must be >= 1 (got {chunk_rows})")
        self.layers, self.heads, self.seq_len, self.d_head = list(layers), list(heads), seq_len, d_head
        self.chunk_rows = chunk_rows
        self.t: dict[str, torch.Tensor] = {}

    def _acc(self, name: str, value: torch.Tensor) -> None:
        v = value.detach().to("cpu", torch.float64)
        self.t[name] = v.clone() if name not in self.t else self.t[name] + v

    @staticmethod
    def chunk_scores(call: AttentionCall, hs: torch.Tensor, a: int, b: int) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Scores (B, h, b - a, N) of query rows a..b-1, computed as ``call.scores`` (float32; float64 for a float64
        model) and returned in float64, with their valid mask."""
        dt = torch.float64 if call.query.dtype == torch.float64 else torch.float32
        q, k = call.query[:, hs, a:b].to(dt), call.key[:, hs].to(dt)
        s = (q @ k.transpose(-1, -2)) * call.scaling
        if call.softcap:
            s = torch.tanh(s / call.softcap) * call.softcap
        if call.bias is not None:
            bias = call.bias if call.bias.shape[1] == 1 else call.bias[:, hs]
            s = s + bias[:, :, a:b].to(dt)
        valid = None if call.valid is None else call.valid[:, :, a:b]
        if valid is not None:
            s = s.masked_fill(~valid, float("-inf"))
        return s.double(), valid

    def __call__(self, call: AttentionCall) -> None:
        if call.layer not in self.layers:
            return
        B, H, nq, dh = call.query.shape
        n = call.key.shape[2]
        if nq != self.seq_len or n != self.seq_len:
            raise ShapeError(f"attention is {nq}x{n} but the fit was set up for --seq-len {self.seq_len}")
        self.d_head = dh
        hs = torch.tensor(self.heads, device=call.query.device)
        nh = len(self.heads)
        sx = torch.zeros(nh, nq, n, dtype=torch.float64, device=call.query.device)  # per query position
        sxx = torch.zeros(nh, n, n, dtype=torch.float64, device=call.query.device)
        cnt = torch.zeros(nh, nq, dtype=torch.float64, device=call.query.device)
        for a in range(0, nq, self.chunk_rows):
            b = min(nq, a + self.chunk_rows)
            s, valid = self.chunk_scores(call, hs, a, b)  # (B, h, c, N)
            x = row_centre(s, valid)
            row_ok = torch.ones(B, 1, b - a, dtype=torch.bool, device=s.device) if valid is None else valid.any(-1)
            x = x * row_ok.unsqueeze(-1).expand(B, nh, b - a, 1)  # rows without a key contribute 0
            cnt[:, a:b] = row_ok.expand(B, nh, b - a).double().sum(0)
            sx[:, a:b] = x.sum(0)
            sxx += torch.einsum("bhin,bhim->hnm", x, x)
            del s, x
        valid = call.valid
        q = call.query[:, hs].double()
        k = call.key[:, hs].double()
        if valid is None:
            kvalid = torch.ones(B, 1, n, dtype=torch.bool, device=k.device)
        else:  # keys some query may see, without an (B, N, N) intermediate beyond the mask itself
            kvalid = torch.zeros(B, 1, n, dtype=torch.bool, device=k.device)
            for a in range(0, nq, self.chunk_rows):
                kvalid |= valid[:, :, a:a + self.chunk_rows].any(-2)
        kv = kvalid.unsqueeze(-1).double()
        kmean = (k * kv).sum(2, keepdim=True) / kv.sum(2, keepdim=True).clamp_min(1)
        kc = (k - kmean) * kv
        sqq = torch.einsum("bhnd,bhne->hde", q, q)
        skk = torch.einsum("bhnd,bhne->hde", kc, kc)
        nqk = torch.tensor([float(B * nq)], dtype=torch.float64)
        nk = kv.sum().reshape(1) * 1.0
        for j, h in enumerate(self.heads):
            key = f"{call.layer}.{h}"
            self._acc(f"sx.{key}", sx[j])
            self._acc(f"cnt.{key}", cnt[j])
            self._acc(f"sxx.{key}", sxx[j])
            self._acc(f"sqq.{key}", sqq[j])
            self._acc(f"skk.{key}", skk[j])
            self._acc(f"nq.{key}", nqk)
            self._acc(f"nk.{key}", nk.cpu())


ProxySpec = tuple[str, int, int]  # (proxy kind, rank, seed), as in ReconstructionFit.proxy


def residual_prefix(kind: str, rank: int, seed: int) -> str:
    """Tensor-name prefix of the residual statistics of one proxy, e.g. 'resid.bilinear.r4.s0'."""
    return f"resid.{kind}.r{int(rank)}.s{int(seed)}"


class ResidualCollector:
    """Sink for ``stream_attention``: per (layer, head) and proxy, streaming float64 mean / covariance of the
    row-centred residual rows s - p (:class:`StreamingCovariance`, valid rows only) and their sums per query
    position (for the position-conditioned mean)."""

    def __init__(self, fit: Any, proxies: list[ProxySpec]):  # fit: a ReconstructionFit (its proxies)
        self.fit, self.proxies = fit, list(proxies)
        self.cov: dict[tuple[str, str], StreamingCovariance] = {}  # (prefix, 'layer.head') -> statistics
        self.pos: dict[tuple[str, str], torch.Tensor] = {}  # same keys -> (N, N + 1): per-position sums, count

    def __call__(self, call: AttentionCall) -> None:
        if call.layer not in self.fit.layers:
            return
        valid = call.valid
        for h in self.fit.heads:
            s = call.scores(torch.tensor([h], device=call.query.device))[:, 0].double()  # (B, N, N)
            row_ok = valid[:, 0].any(-1).expand(s.shape[:2]) if valid is not None else None  # (B, N)
            for kind, rank, seed in self.proxies:
                px = self.fit.proxy(call.layer, h, kind, rank, seed)
                x = row_centre(s - px.scores(call.query[:, h], call.key[:, h], call.scaling).double(),
                               None if valid is None else valid[:, 0])
                name = (residual_prefix(kind, rank, seed), f"{call.layer}.{h}")
                ok = torch.ones(s.shape[:2], dtype=torch.bool, device=s.device) if row_ok is None else row_ok
                x = x * ok.unsqueeze(-1)
                self.cov.setdefault(name, StreamingCovariance(s.shape[-1])).update(x[ok])
                sums = torch.cat([x.sum(0), ok.double().sum(0).unsqueeze(-1)], -1).cpu()
                self.pos[name] = sums if name not in self.pos else self.pos[name] + sums

    def tensors(self) -> dict[str, torch.Tensor]:
        """Tensors to store in the fit: '<prefix>.{n,mean,m2,pos}.<layer>.<head>'."""
        out: dict[str, torch.Tensor] = {}
        for (pre, lh), c in self.cov.items():
            out.update({f"{pre}.{k}.{lh}": v for k, v in c.state().items()})
            out[f"{pre}.pos.{lh}"] = self.pos[(pre, lh)]
        return out
