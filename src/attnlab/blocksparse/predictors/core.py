"""Shared machinery of the block predictors: the prediction record, exact block mass, mass selection,
recall on sampled rows, and per-head calibration of a method's knob.

A block predictor estimates, for every (query block, key block) tile, how much softmax mass it carries,
then keeps tiles per head according to one scalar *knob* (a cumulative-mass threshold, a budget scale, ...)
that raises recall monotonically. ``predict(q, k, causal=..., block_size=..., p=...)`` either maps ``p`` to
the method's published knob (``calibrate=False``) or searches a per-head knob so that the exact recall on
``calib_rows`` sampled query rows reaches ``p`` plus a safety margin (``calibrate=True``, the default). The
exact scores of those rows are part of the prediction and their multiply-adds are in ``cost``.

Recall and row sampling live in :mod:`attnlab.blocksparse.recall` (re-exported here): calibration rows
are even positions and held-out rows odd positions, so the two never overlap.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from attnlab.errors import ConfigError
from attnlab.blocksparse.blockmask import BlockPattern, block_graph_to_kv
from attnlab.blocksparse.recall import (  # noqa: F401  (re-exported: the predictors' shared machinery)
    _block_mass,
    check_inputs,
    exact_block_mass,
    expand_kv_heads,
    head_recall,
    pattern_row_recall,
    row_block_mass,
    row_token_probs,
    sample_rows,
    tile_density,
)

__all__ = [
    "BlockPredictor",
    "BlockPrediction",
    "ScoredBlockMethod",
    "sample_rows",
    "row_block_mass",
    "row_token_probs",
    "exact_block_mass",
    "mass_select",
    "mass_thresholds",
    "keep_graph",
    "calibrate_knob",
    "KnobSearch",
    "graph_pattern",
    "pattern_row_recall",
    "head_recall",
    "tile_density",
    "expand_kv_heads",
    "check_inputs",
]


@runtime_checkable
class BlockPredictor(Protocol):
    """The interface ``sparse_attention`` runs: anything that turns (q, k) into a block pattern."""

    def predict_blocks(self, q: Tensor, k: Tensor, block_size: int = 128, causal: bool = False) -> BlockPattern:
        """q, k (B, H, N, D) -> :class:`BlockPattern`."""
        ...


@dataclass
class BlockPrediction:
    """What a block predictor returns: the pattern (kv lists with FULL and PARTIAL tiles apart), the
    multiply-adds its prediction cost (all batch rows and heads, calibration included), the per-head knob
    it used (H,) and method-specific details (``info``, e.g. calibration recall per head)."""

    pattern: BlockPattern
    cost: float
    knob: Tensor | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def density(self) -> float:
        """Kept tiles / tiles dense attention computes (causal: nq(nq+1)/2 per head)."""
        return tile_density(self.pattern)


def _forced(nq: int, nk: int, causal: bool, sink_blocks: int, device: torch.device) -> Tensor:
    f = torch.zeros(nq, nk, dtype=torch.bool, device=device)
    f |= torch.eye(nq, nk, dtype=torch.bool, device=device)
    if sink_blocks > 0:
        f[:, :sink_blocks] = True
    if causal:
        f &= torch.ones(nq, nk, dtype=torch.bool, device=device).tril_()
    return f


def mass_thresholds(mass: Tensor, causal: bool, sink_blocks: int = 0, scope: str = "row") -> Tensor:
    """Inclusion thresholds (B, H, nq, nk) of a cumulative-mass rule: tiles are taken largest (estimated)
    mass first, per row (``scope='row'``) or over the whole head (``'head'``), and a tile is kept at threshold
    ``tau`` iff the mass ranked above it is below ``tau`` of the total, i.e. iff its threshold < tau.
    The diagonal and the first ``sink_blocks`` key blocks are always kept (-inf, their mass counts first);
    tiles with zero mass and causal future tiles never are (+inf)."""
    B, H, nq, nk = mass.shape
    dev = mass.device
    forced = _forced(nq, nk, causal, sink_blocks, dev)
    m = mass.float() if mass.dtype != torch.float64 else mass
    if causal:
        m = m.masked_fill(~torch.ones(nq, nk, dtype=torch.bool, device=dev).tril_(), 0.0)
    prio = torch.where(forced, torch.full_like(m, float("inf")), m)
    if scope == "head":
        flat_p, flat_m = prio.reshape(B, H, 1, nq * nk), m.reshape(B, H, 1, nq * nk)
    elif scope == "row":
        flat_p, flat_m = prio, m
    else:
        raise ConfigError(f"scope must be 'row' or 'head', got {scope!r}")
    total = flat_m.sum(-1, keepdim=True).clamp_min(torch.finfo(m.dtype).tiny)
    order = torch.argsort(flat_p, dim=-1, descending=True)
    ms = torch.gather(flat_m, -1, order)
    before = (torch.cumsum(ms, dim=-1) - ms) / total
    before = torch.where(ms > 0, before, torch.full_like(before, float("inf")))
    th = torch.empty_like(before).scatter_(-1, order, before).view(B, H, nq, nk)
    return th.masked_fill(forced, float("-inf"))


def keep_graph(thresholds: Tensor, knob: Tensor | float) -> Tensor:
    """Bool graph of tiles kept at ``knob`` (float or (H,)): threshold < knob."""
    k = torch.as_tensor(knob, dtype=thresholds.dtype, device=thresholds.device)
    return thresholds < (k.view(1, -1, 1, 1) if k.dim() == 1 else k)


def mass_select(mass: Tensor, tau: Tensor | float, causal: bool, sink_blocks: int = 0,
                scope: str = "row") -> Tensor:
    """Keep per row (``scope='row'``) or per head (``'head'``: over all tiles) the fewest tiles whose mass
    reaches ``tau`` (float or (H,)) of the total, largest first (see :func:`mass_thresholds`). -> bool graph."""
    return keep_graph(mass_thresholds(mass, causal, sink_blocks, scope), tau)


class KnobSearch:
    """Exact per-head knob search on calibration rows: recall(knob) is a step function of the tile thresholds,
    so one sort and one cumulative sum (done once) answer any target. ``thresholds`` (B, H, nq, nk);
    ``row_mass`` (B, H, R, nk): exact mass of each row per key tile (in the pattern's key order); ``q_tile``
    (B, H, R): each row's query tile."""

    def __init__(self, thresholds: Tensor, row_mass: Tensor, q_tile: Tensor) -> None:
        B, H, R, nk = row_mass.shape
        self.th_rows = torch.gather(thresholds, 2, q_tile.unsqueeze(-1).expand(B, H, R, nk))
        self.row_mass = row_mass
        th = self.th_rows.transpose(0, 1).reshape(H, -1)
        w = row_mass.transpose(0, 1).reshape(H, -1).to(torch.float64) / (B * R)
        order = torch.argsort(th, dim=-1)
        self.ths = torch.gather(th, -1, order)
        self.keepable = self.ths < float("inf")
        self.cw = torch.cumsum(torch.gather(w, -1, order), -1)
        self.last = (self.keepable.sum(-1) - 1).clamp_min(0)

    def knob(self, target: Tensor) -> tuple[Tensor, Tensor]:
        """(smallest knob (H,) whose recall >= target (H,), reached (H,) bool; else the knob keeping all)."""
        hit = (self.cw >= target.to(self.cw.dtype).view(-1, 1) - 1e-12) & self.keepable
        reached = hit.any(-1)
        first = hit.to(torch.int8).argmax(-1)
        t = torch.gather(self.ths, -1, torch.where(reached, first, self.last).unsqueeze(-1)).squeeze(-1)
        return torch.nextafter(t, torch.full_like(t, float("inf"))), reached

    def per_row(self, knob: Tensor) -> Tensor:
        """Recall (B, H, R) of each calibration row at ``knob`` (H,)."""
        kept = self.th_rows < knob.view(1, -1, 1, 1)
        return (kept.to(self.row_mass.dtype) * self.row_mass).sum(-1)


def calibrate_knob(thresholds: Tensor, row_mass: Tensor, q_tile: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """Smallest per-head knob whose pattern (threshold < knob) keeps mean recall >= ``target`` (H,) on the
    calibration rows (see :class:`KnobSearch`). Returns (knob (H,), reached (H,) bool)."""
    return KnobSearch(thresholds, row_mass, q_tile).knob(target)


def graph_pattern(graph: Tensor, block_size: int, causal: bool) -> BlockPattern:
    """Bool block graph -> :class:`BlockPattern` (causal: diagonal tiles PARTIAL with the causal mask_mod,
    strictly-lower tiles FULL, future tiles dropped; non-causal: every kept tile FULL)."""
    return BlockPattern(block_graph_to_kv(graph, causal), block_size, causal)


class _Clock:
    """Phase timer (CUDA-synchronised) for ``profile``; a no-op when off."""

    def __init__(self, on: bool) -> None:
        self.on = on
        self.ms: dict[str, float] = {}
        if on:
            torch.cuda.synchronize()
        self.t = time.perf_counter()

    def __call__(self, name: str) -> None:
        if self.on:
            torch.cuda.synchronize()
            t = time.perf_counter()
            self.ms[name] = (t - self.t) * 1e3
            self.t = t


@dataclass
class ScoredBlockMethod:
    """Base of every block predictor. ``prepare`` estimates once; ``thresholds`` gives every tile the knob value
    above which it is kept (monotone: a larger knob keeps a superset); ``build`` makes the pattern.

    calibrate: choose a per-head knob from ``calib_rows`` exact rows (else the published knob for ``p``).
    p: the default mass-recall target (``predict(p=None)`` and ``predict_blocks``).
    margin_z: safety margin, in standard errors of the difference between the calibration rows' mean recall
    and that of ``eval_rows`` other rows (target = p + z * sd * sqrt(1/calib_rows + 1/eval_rows), per head).
    profile: record CUDA-synchronised milliseconds per phase in ``info['ms']``."""

    calibrate: bool = True
    p: float = 0.95
    calib_rows: int = 512
    eval_rows: int = 512
    margin_z: float = 2.5
    seed: int = 0
    profile: bool = False

    # -- subclass API ---------------------------------------------------------------------------------------
    def prepare(self, q: Tensor, k: Tensor, causal: bool, block_size: int, scale: float) -> tuple[Any, float]:
        """(state, multiply-adds) of the estimation step (q, k already have equal heads)."""
        raise NotImplementedError

    def thresholds(self, state: Any, causal: bool, block_size: int) -> Tensor:
        """(B, H, nq, nk) knob values above which each tile is kept (-inf: always, +inf: never)."""
        raise NotImplementedError

    def permutation(self, state: Any) -> tuple[Tensor, Tensor] | None:
        """(q_perm, k_perm) (B, H, N) when the tiles live in a token order sorted per head, else None."""
        return None

    def default_knob(self, p: float, n: int) -> float:
        """The published setting for mass target ``p`` (used without calibration)."""
        return p

    def build(self, state: Any, graph: Tensor, causal: bool, block_size: int) -> BlockPattern:
        """Pattern of a kept-tile graph (original token order unless :meth:`permutation`)."""
        return graph_pattern(graph, block_size, causal)

    # -- the uniform entry point ---------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, q: Tensor, k: Tensor, causal: bool = True, block_size: int = 128, p: float | None = None,
                scale: float | None = None) -> BlockPrediction:
        """q (B, H, N, D), k (B, Hk, N, D) -> :class:`BlockPrediction` aiming at mean mass recall ``p`` per head
        (default: the ``p`` field)."""
        check_inputs(q, k, block_size)
        p = self.p if p is None else p
        if not 0.0 < p <= 1.0:
            raise ConfigError(f"--mass: the recall target p must be in (0, 1], got {p}")
        B, H, N, D = q.shape
        scale = D ** -0.5 if scale is None else scale
        k = expand_kv_heads(k, H)
        clock = _Clock(self.profile and q.is_cuda)
        state, cost = self.prepare(q, k, causal, block_size, scale)
        clock("prepare")
        th = self.thresholds(state, causal, block_size)
        clock("thresholds")
        if not self.calibrate:
            knob = torch.full((H,), float(self.default_knob(p, N)), device=q.device, dtype=th.dtype)
            info: dict[str, Any] = {"calibrated": False}
        else:
            knob, info, ccost = self._calibrate(q, k, state, th, causal, block_size, scale, p)
            cost += ccost
            clock("calibrate")
        pred = BlockPrediction(self.build(state, keep_graph(th, knob), causal, block_size), cost, knob, info)
        clock("build")
        if clock.on:
            info["ms"] = clock.ms
        return pred

    def predict_blocks(self, q: Tensor, k: Tensor, block_size: int = 128, causal: bool = False,
                       scale: float | None = None) -> BlockPattern:
        """The block-predictor protocol of ``sparse_attention``: the pattern for target ``self.p``."""
        return self.predict(q, k, causal, block_size, None, scale).pattern

    def _calibrate(self, q: Tensor, k: Tensor, state: Any, th: Tensor, causal: bool, block_size: int,
                   scale: float, p: float) -> tuple[Tensor, dict[str, Any], float]:
        B, H, N, D = q.shape
        rows = sample_rows(N, self.calib_rows, self.seed, 0, q.device)
        R = rows.numel()
        cost = float(B * H * R * N * D)  # exact scores of the calibration rows
        perm = self.permutation(state)
        if perm is None:
            row_mass = row_block_mass(q, k, rows, block_size, causal, scale)
            q_tile = (rows // block_size).view(1, 1, R).expand(B, H, R)
        else:
            q_perm, k_perm = perm
            probs = row_token_probs(q, k, rows, causal, scale)  # (B, H, R, N) original key order
            probs = torch.gather(probs, -1, k_perm.unsqueeze(2).expand_as(probs))  # sorted key order
            row_mass = probs.view(B, H, R, -1, block_size).sum(-1)
            inv_q = torch.argsort(q_perm, dim=-1)
            q_tile = inv_q[:, :, rows] // block_size
        search = KnobSearch(th, row_mass, q_tile)
        knob, reached = search.knob(torch.full((H,), float(p), device=q.device))
        sd = search.per_row(knob).float().transpose(0, 1).reshape(H, -1).std(dim=-1).nan_to_num(0.0)
        margin = self.margin_z * sd * math.sqrt(1.0 / max(1, R * B) + 1.0 / max(1, self.eval_rows * B))
        knob, reached = search.knob((p + margin).clamp(max=1.0))
        rec = search.per_row(knob).float().mean(dim=(0, 2))
        info = {"calibrated": True, "calib_rows": R, "calib_recall": rec.tolist(), "margin": margin.tolist(),
                "reached": reached.tolist()}
        return knob, info, cost
