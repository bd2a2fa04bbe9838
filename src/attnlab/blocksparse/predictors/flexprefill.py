"""FlexPrefill (Lai et al., ICLR 2025; arXiv 2502.20766), from the paper's description.

Per head and input: the last block of queries (``block_size`` queries) is scored exactly against all keys
(causal softmax), giving a true key-block distribution for those queries (vertical: mean over the queries,
pooled per key block) and a pooled estimate (softmax of the mean last query against mean-pooled key blocks).
If the square root of their Jensen-Shannon divergence is below ``tau`` the pooled estimate is trusted and the
head is *query-aware*: every query block is scored by mean-pooled q against mean-pooled k (causal block
softmax) and tiles are kept, over the whole head, in decreasing score until their cumulative score reaches
``gamma`` of the total. Otherwise the head is *vertical-slash*: the numbers of key blocks and diagonal
blocks are those whose tokens cover ``gamma`` of the last queries' vertical and slash mass, at least
``min_budget`` tokens worth of blocks, and the top-scored key blocks / block diagonals are kept. The first key
block and the diagonal are always kept. Knob: ``gamma`` (per head with calibration). Causal only.
Cost: block_size * N * D (last queries) + (N/bs)^2 * D (pooled scores) multiply-adds per head.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from attnlab.errors import ConfigError

from .registry import BLOCK_PREDICTORS
from .core import ScoredBlockMethod, mass_thresholds
from .minference import _rank, last_query_probs, vertical_slash_scores


def sqrt_js_divergence(p: Tensor, q: Tensor, eps: float = 1e-12) -> Tensor:
    """sqrt(JSD(p, q)) over the last axis (natural log)."""
    p = p.clamp_min(eps)
    q = q.clamp_min(eps)
    m = (p + q) / 2
    js = 0.5 * (p * (p / m).log()).sum(-1) + 0.5 * (q * (q / m).log()).sum(-1)
    return js.clamp_min(0).sqrt()


def _budget_thresholds(x: Tensor, rank: Tensor, block_size: int, lo: int) -> Tensor:
    """Blocks ranked ``rank`` (B, H, nb) are kept at gamma iff their rank < max(lo, c // bs + 1), where c is the
    number of largest tokens of ``x`` (B, H, N) whose cumulative share stays below gamma: the threshold of rank
    r >= lo is the share ranked above the (r * bs)-th token (-inf below ``lo``)."""
    xs = torch.sort(x / x.sum(-1, keepdim=True).clamp_min(1e-30), dim=-1, descending=True).values
    before = torch.cumsum(xs, -1) - xs  # (B, H, N), nondecreasing
    idx = (rank.long() * block_size - 1).clamp_min(0)
    th = torch.gather(before, -1, idx)
    return th.masked_fill(rank < lo, float("-inf")).float()


@BLOCK_PREDICTORS.register("flexprefill", help="FlexPrefill: per-head query-aware vs vertical-slash, gamma mass",
                           tags=("published",))
@dataclass
class FlexPrefillBlocks(ScoredBlockMethod):
    """FlexPrefill's pattern choice and cumulative-gamma budget; knob = gamma per head."""

    tau: float = 0.1
    min_budget: int = 1024

    def prepare(self, q: Tensor, k: Tensor, causal: bool, block_size: int, scale: float) -> tuple[Any, float]:
        """Last-block probabilities, vertical/slash scores, JS test and the pooled block scores."""
        if not causal:
            raise ConfigError("flexprefill: defined for causal prefill only")
        B, H, N, D = q.shape
        nb = N // block_size
        a = last_query_probs(q, k, block_size, scale)  # (B, H, L, N)
        L = a.shape[2]
        vertical, slash = vertical_slash_scores(a)
        vertical, slash = vertical / L, slash / L
        v_blk = vertical.view(B, H, nb, block_size).sum(-1)
        s_blk = slash.view(B, H, nb, block_size).sum(-1)  # block offset d = floor(offset / bs)
        dt = v_blk.dtype
        k_pool = k.to(dt).view(B, H, nb, block_size, D).mean(3)
        q_pool = q.to(dt).view(B, H, nb, block_size, D).mean(3)
        est = torch.softmax(torch.matmul(q_pool[:, :, -1:], k_pool.transpose(-1, -2)).squeeze(2) * scale, -1)
        query_aware = sqrt_js_divergence(est, v_blk) < self.tau  # (B, H)
        s = torch.matmul(q_pool, k_pool.transpose(-1, -2)) * scale
        s = s.masked_fill(~torch.ones(nb, nb, dtype=torch.bool, device=q.device).tril_(), float("-inf"))
        qa_mass = torch.softmax(s, dim=-1)
        v_prio = v_blk.clone()
        v_prio[..., 0] = float("inf")
        s_prio = s_blk.clone()
        s_prio[..., 0] = float("inf")
        state = {"vertical": vertical, "slash": slash, "v_rank": _rank(torch.argsort(v_prio, -1, descending=True)),
                 "s_rank": _rank(torch.argsort(s_prio, -1, descending=True)), "qa": query_aware,
                 "qa_mass": qa_mass, "nb": nb}
        cost = float(B * H * (L * N * D + 2 * N * D + nb * nb * D))
        return state, cost

    def thresholds(self, state: Any, causal: bool, block_size: int) -> Tensor:
        """Vertical-slash blocks covering gamma (>= min budget); query-aware heads add their gamma tiles."""
        nb = state["nb"]
        B, H = state["qa"].shape
        lo = min(nb, max(1, math.ceil(self.min_budget / block_size)))
        qa = state["qa"].view(B, H, 1)
        t_v = _budget_thresholds(state["vertical"], state["v_rank"], block_size, lo)
        t_s = _budget_thresholds(state["slash"], state["s_rank"], block_size, lo)
        t_v = torch.where(qa & (state["v_rank"] >= lo), torch.full_like(t_v, float("inf")), t_v)
        t_s = torch.where(qa & (state["s_rank"] >= lo), torch.full_like(t_s, float("inf")), t_s)
        i = torch.arange(nb, device=t_v.device)
        d = i.view(-1, 1) - i.view(1, -1)
        th_s = torch.gather(t_s, -1, d.clamp_min(0).view(1, 1, -1).expand(B, H, -1)).view(B, H, nb, nb)
        th = torch.minimum(t_v.unsqueeze(-2), th_s)
        t_qa = mass_thresholds(state["qa_mass"], True, 1, "head").to(th.dtype)
        th = torch.where(qa.unsqueeze(-1), torch.minimum(th, t_qa), th)
        th = th.masked_fill(d < 0, float("inf"))
        return th.masked_fill(d == 0, float("-inf"))
