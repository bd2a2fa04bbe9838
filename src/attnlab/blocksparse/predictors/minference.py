"""MInference's vertical-slash pattern (Jiang et al. 2024, microsoft/MInference), from the paper's description.

The last ``last_q`` (64) queries are scored against all keys (causal, softmax). Summed over those queries,
each key column gives a *vertical* score and each diagonal offset (query position - key position) a
*slash* score. The top ``vertical_size`` columns (the first 30 always) and the top ``slash_size`` diagonals
(the 100 nearest always) are kept for every query. On tiles: a tile is kept when it contains a kept column
(causally reachable) or a kept diagonal crosses it. MInference's own kernel handles verticals per column;
a tile kernel must compute the whole 128-wide tile, so the pattern here is coarser than the paper's.
Knob: a scale ``s`` on the published sizes (1000 verticals, 6096 slashes, the LLaMA-3 defaults), searched
per head by calibration (the paper fixes per-head sizes offline). Causal only.
Cost: last_q * N * D multiply-adds per head.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from attnlab.errors import ConfigError

from .registry import BLOCK_PREDICTORS
from .core import ScoredBlockMethod

def last_query_probs(q: Tensor, k: Tensor, last_q: int, scale: float) -> Tensor:
    """Causal softmax (B, H, L, N) of the last ``last_q`` queries over all keys (float32/float64)."""
    N = q.shape[2]
    L = min(last_q, N)
    dt = torch.float64 if q.dtype == torch.float64 else torch.float32
    s = torch.matmul(q[:, :, N - L:].to(dt), k.to(dt).transpose(-1, -2)) * scale
    pos = torch.arange(N - L, N, device=q.device).view(-1, 1)
    s = s.masked_fill(torch.arange(k.shape[2], device=q.device).view(1, -1) > pos, float("-inf"))
    return torch.softmax(s, dim=-1)

def vertical_slash_scores(a: Tensor) -> tuple[Tensor, Tensor]:
    """Probabilities (B, H, L, N) of the last L queries -> (vertical (B, H, N) per key column,
    slash (B, H, N) per offset o = query position - key position), both summed over the L queries."""
    B, H, L, N = a.shape
    vertical = a.sum(dim=2)
    pos = torch.arange(N - L, N, device=a.device).view(-1, 1)
    off = (pos - torch.arange(N, device=a.device).view(1, -1)).clamp_min(0)  # future keys have prob 0
    slash = torch.zeros(B, H, N, dtype=a.dtype, device=a.device)
    slash.scatter_add_(-1, off.reshape(1, 1, -1).expand(B, H, -1), a.reshape(B, H, -1))
    return vertical, slash

def _rank(order: Tensor) -> Tensor:
    """Inverse of an argsort: rank[..., order[..., r]] = r."""
    r = torch.empty_like(order)
    return r.scatter_(-1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order))

def vertical_slash_thresholds(theta_col: Tensor, theta_off: Tensor, block_size: int) -> Tensor:
    """Per-column (B, H, N) and per-offset (B, H, N) keep thresholds -> causal tile thresholds (B, H, nb, nb):
    a tile is kept as soon as one of its columns or one diagonal crossing it is (min of their thresholds);
    the diagonal tile always, future tiles never."""
    B, H, N = theta_col.shape
    nb = N // block_size
    t_v = theta_col.view(B, H, nb, block_size).amin(-1)  # key block j
    so = theta_off.view(B, H, nb, block_size)
    t_s = so.amin(-1)  # offset o crosses block offset o // bs ...
    t_s[..., 1:] = torch.minimum(t_s[..., 1:], so[..., :-1, 1:].amin(-1))  # ... and o // bs + 1 if o % bs
    i = torch.arange(nb, device=theta_col.device)
    d = i.view(-1, 1) - i.view(1, -1)
    th_s = torch.gather(t_s, -1, d.clamp_min(0).view(1, 1, -1).expand(B, H, -1)).view(B, H, nb, nb)
    th = torch.minimum(t_v.unsqueeze(-2), th_s)
    th = th.masked_fill(d < 0, float("inf"))
    return th.masked_fill(d == 0, float("-inf"))

@BLOCK_PREDICTORS.register("minference", help="MInference vertical-slash (last 64 queries; top columns/diagonals)",
                           tags=("published",))
@dataclass
class MInferenceBlocks(ScoredBlockMethod):
    """Vertical-slash from the last ``last_q`` queries; knob = scale on (vertical_size, slash_size)."""

    last_q: int = 64
    vertical_size: int = 1000
    slash_size: int = 6096
    sink_tokens: int = 30
    local_offsets: int = 100

    def default_knob(self, p: float, n: int) -> float:
        """The published sizes (p is not used by the uncalibrated method)."""
        return 1.0

    def prepare(self, q: Tensor, k: Tensor, causal: bool, block_size: int, scale: float) -> tuple[Any, float]:
        """Column and diagonal ranks from the last queries' exact probabilities."""
        if not causal:
            raise ConfigError("minference: the vertical-slash pattern is defined for causal prefill only")
        B, H, N, D = q.shape
        a = last_query_probs(q, k, self.last_q, scale)
        vertical, slash = vertical_slash_scores(a)
        vertical[..., : self.sink_tokens] = float("inf")
        slash[..., : self.local_offsets] = float("inf")
        state = (_rank(torch.argsort(vertical, -1, descending=True)),
                 _rank(torch.argsort(slash, -1, descending=True)), N)
        return state, float(B * H * a.shape[2] * N * D)

    def thresholds(self, state: Any, causal: bool, block_size: int) -> Tensor:
        """Column of rank r is kept at scale s iff r < s * vertical_size (the first ``sink_tokens`` always);
        likewise diagonals with ``slash_size`` (the nearest ``local_offsets`` always)."""
        v_rank, s_rank, N = state
        t_col = (v_rank.float() + 0.5) / self.vertical_size
        t_col = t_col.masked_fill(v_rank < min(self.sink_tokens, N), float("-inf"))
        t_off = (s_rank.float() + 0.5) / self.slash_size
        t_off = t_off.masked_fill(s_rank < min(self.local_offsets, N), float("-inf"))
        return vertical_slash_thresholds(t_col, t_off, block_size)
