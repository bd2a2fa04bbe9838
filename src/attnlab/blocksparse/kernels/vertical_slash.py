"""MInference's vertical-slash tile pattern with a fixed per-head knob, fast: one pass, no host sync, one CUDA graph.

Same pattern as the reference (:class:`attnlab.blocksparse.predictors.minference.MInferenceBlocks` with
``prepare -> thresholds -> keep_graph(th, knob)``), computed differently:

* grouped-query aware: the ``G`` query heads of a key head are stacked as rows of one product against that
  key head (no repeated keys), the last ``L`` queries and the ``R`` recall-check rows in the same product;
* the keys are read in reversed order, so the diagonal ("slash") sums become a strided view of the
  probabilities (one reduction, no scatter);
* float32 scores of bfloat16/float16 inputs use TF32 matrix units, which is exact here: a bf16/fp16 value
  fits in TF32's 10-bit mantissa, so every product is exact and sums are float32;
* the kv lists come from a cumulative sum and one scatter (no sort of the tile graph);
* the recall check on ``R`` held-out rows (exact softmax mass of those rows kept by the pattern) is part of
  the same pass, so the only host sync per layer is the caller's one read of density and recall.

The column, diagonal and check-row sums come from one of :data:`STATS_BACKENDS`: ``eager`` (the torch code
below: float32 probabilities of every selected row in memory) or ``triton`` (:mod:`.vertical_slash_triton`, two
fused launches, ~1.7x faster on an H200 at 16k-128k); ``auto`` takes triton on CUDA.

On CUDA, :class:`VerticalSlashPlan` captures the whole pass once per shape in a CUDA graph (static input
buffers: the selected query rows, the reversed key heads and the knob), so a layer's prediction is three
copies and one graph replay instead of ~60 eager launches. Elsewhere (and if capture fails) it runs eagerly.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from typing import Any, Iterator, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from attnlab.blocksparse.blockmask import KVBlocks
from attnlab.blocksparse.kernels.runtime import triton_can_run
from attnlab.errors import ConfigError, ShapeError

__all__ = ["STATS_BACKENDS", "VSParams", "VSResult", "VerticalSlashPlan", "vertical_slash_fast", "lossless_tf32",
           "plan_for"]


@dataclass(frozen=True)
class VSParams:
    """The vertical-slash settings (the reference method's fields) and the tile size."""

    last_q: int = 64
    vertical_size: int = 1000
    slash_size: int = 6096
    sink_tokens: int = 30
    local_offsets: int = 100
    block_size: int = 128


class VSResult(NamedTuple):
    """Pattern (causal kv lists: diagonal partial, the rest full), per-head density of the causal tiles (H,),
    per-head recall on the check rows (H,) and its standard deviation over rows (H,)."""

    kv: KVBlocks
    density: Tensor
    recall: Tensor
    recall_sd: Tensor


@contextlib.contextmanager
def lossless_tf32(src_dtype: torch.dtype, device: torch.device) -> Iterator[None]:
    """Allow TF32 matrix products while the inputs are bf16/fp16 values cast to float32 (exact products)."""
    if device.type != "cuda" or src_dtype not in (torch.bfloat16, torch.float16):
        yield
        return
    m = torch.backends.cuda.matmul
    old = m.allow_tf32
    m.allow_tf32 = True
    try:
        yield
    finally:
        m.allow_tf32 = old


def _constants(n: int, rows: Tensor, p: VSParams, device: torch.device) -> dict[str, Tensor]:
    bs, L = p.block_size, min(p.last_q, n)
    nb = n // bs
    pos_rows = torch.cat([torch.arange(n - L, n, device=device), rows.to(device)])  # query positions
    m = torch.arange(n, device=device)  # reversed key index: key j = n - 1 - m
    i = torch.arange(nb, device=device)
    d = i.view(-1, 1) - i.view(1, -1)
    return {"pos_rows": pos_rows, "fut": (n - 1 - m).view(1, -1) > pos_rows.view(-1, 1),
            "rank": m.to(torch.float32), "dclamp": d.clamp_min(0).reshape(1, 1, -1), "strict": d > 0,
            "eye": d == 0, "jj": i.to(torch.int32).view(1, 1, 1, nb).expand(1, 1, nb, nb),
            "qb": rows.to(device) // bs}


def _kept(score: Tensor, knob: Tensor, size: int, forced: int, rank: Tensor) -> Tensor:
    """Bool (B, H, n): entries of rank r kept iff (r + 0.5) / size < knob or r < forced (rank by score)."""
    order = torch.sort(score, dim=-1, descending=True).indices
    keep_sorted = ((rank + 0.5) / size < knob.view(1, -1, 1)) | (rank < forced)
    return torch.zeros_like(score, dtype=torch.bool).scatter_(-1, order, keep_sorted.expand_as(order))


def _stats_eager(qsel: Tensor, kf: Tensor, c: dict[str, Tensor], p: VSParams, scale: float,
                 group: int) -> tuple[Tensor, Tensor, Tensor]:
    """qsel (B, Hk, G*(L+R), D) selected query rows per key head; kf (B, Hk, n, D) reversed keys.
    -> vertical (B, H, n) column sums and slash (B, H, n) diagonal sums of the last rows' probabilities (natural
    key order; slash by offset query - key), block mass (B, H, R, nb) of the check rows."""
    B, Hk, _, D = qsel.shape
    n, H, bs = kf.shape[2], Hk * group, p.block_size
    nb, L = n // bs, min(p.last_q, n)
    LR = c["pos_rows"].numel()
    s = torch.matmul(qsel, kf.transpose(-1, -2)).mul_(scale).view(B, H, LR, n)
    a = torch.softmax(s.masked_fill_(c["fut"], float("-inf")), dim=-1)  # reversed key order
    al = a[:, :, :L]
    vertical = al.sum(2).flip(-1)
    padded = F.pad(al, (0, L))  # (B, H, L, n + L): row r shifted by L-1-r gives offset o = pos - key
    slash = padded.as_strided((B, H, L, n), (H * L * (n + L), L * (n + L), n + L - 1, 1), L - 1).sum(2)
    mass = a[:, :, L:].reshape(B, H, LR - L, nb, bs).sum(-1).flip(-1)
    return vertical, slash, mass


def _pattern(vertical: Tensor, slash: Tensor, mass: Tensor, knob: Tensor, c: dict[str, Tensor],
             p: VSParams) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The kept tiles from the column and diagonal sums, and the check rows' recall of them.
    -> (full_cnt, full_idx, density, recall, recall_sd)."""
    B, H, n = vertical.shape
    bs = p.block_size
    nb = n // bs
    vertical, slash = vertical.to(knob.dtype), slash.to(knob.dtype)
    vertical[..., : p.sink_tokens] = float("inf")
    slash[..., : p.local_offsets] = float("inf")
    kept_col = _kept(vertical, knob, p.vertical_size, min(p.sink_tokens, n), c["rank"])
    kept_off = _kept(slash, knob, p.slash_size, min(p.local_offsets, n), c["rank"])
    col_blk = kept_col.view(B, H, nb, bs).any(-1)
    so = kept_off.view(B, H, nb, bs)
    sl_blk = so.any(-1)
    sl_blk[..., 1:] |= so[..., :-1, 1:].any(-1)  # offset o also crosses block offset o // bs + 1 if o % bs
    g = col_blk.unsqueeze(-2) | torch.gather(sl_blk, -1, c["dclamp"].expand(B, H, -1)).view(B, H, nb, nb)
    full = g & c["strict"]
    full_cnt = full.sum(-1, dtype=torch.int32)
    tgt = torch.where(full, torch.cumsum(full, -1) - 1, nb)  # slot of each kept block; dropped -> column nb
    idx = torch.zeros(B, H, nb, nb + 1, dtype=torch.int32, device=vertical.device)
    full_idx = idx.scatter_(-1, tgt, c["jj"].expand(B, H, nb, nb))[..., :nb].contiguous()
    density = ((full_cnt.sum(-1).to(torch.float32) + nb) / (nb * (nb + 1) / 2)).mean(0)
    # recall check: exact block mass of the held-out rows, kept by the pattern (diagonal included)
    kept_rows = (full | c["eye"]).index_select(2, c["qb"])
    rec = (mass.to(knob.dtype) * kept_rows).sum(-1).transpose(0, 1).reshape(H, -1).float()
    return full_cnt, full_idx, density, rec.mean(-1), rec.std(-1).nan_to_num(0.0)


def _core(qsel: Tensor, kf: Tensor, knob: Tensor, c: dict[str, Tensor], p: VSParams, scale: float,
          group: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The eager path: :func:`_stats_eager` then :func:`_pattern`."""
    return _pattern(*_stats_eager(qsel, kf, c, p, scale, group), knob, c, p)


def _core_triton(qrows: Tensor, kn: Tensor, knob: Tensor, c: dict[str, Tensor], p: VSParams, scale: float,
                 group: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The fused path: qrows (B, H, L+R, D) in the input dtype, kn (B, Hk, n, D) keys in natural order."""
    from .vertical_slash_triton import vs_stats_triton

    L = min(p.last_q, kn.shape[2])
    stats = vs_stats_triton(qrows, kn, c["pos_rows"], L, scale, group, p.block_size)
    return _pattern(*stats, knob, c, p)


def _key_heads(k: Tensor, n_heads: int, group: int) -> Tensor:
    """One key head per group: ``k`` with keys repeated per query head (H heads) or already (H // group)."""
    kv = k[:, ::group] if k.shape[1] == n_heads else k
    if kv.shape[1] * group != n_heads:
        raise ShapeError(f"{n_heads} query heads with group {group} need {n_heads // group} key heads, got "
                         f"{k.shape[1]}")
    return kv


def _select(q: Tensor, k: Tensor, c: dict[str, Tensor], group: int, dt: torch.dtype) -> tuple[Tensor, Tensor]:
    """The product's inputs: the selected query rows grouped per key head, and the reversed key heads."""
    B, H, n, D = q.shape
    kv = _key_heads(k, H, group)
    qsel = q.index_select(2, c["pos_rows"]).to(dt).reshape(B, kv.shape[1], -1, D)
    return qsel, kv.flip(2).to(dt)


def _check(q: Tensor, k: Tensor, p: VSParams, rows: Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4 or q.shape[2] != k.shape[2] or q.shape[2] % p.block_size:
        raise ShapeError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must be (B, H, N, D) with N a multiple of "
                         f"block_size {p.block_size}")
    if rows.numel() < 1 or int(rows.max()) >= q.shape[2]:
        raise ShapeError(f"check rows must be non-empty positions below N={q.shape[2]}")


def _wrap(full_cnt: Tensor, full_idx: Tensor, density: Tensor, rec: Tensor, sd: Tensor) -> VSResult:
    B, H, nb = full_cnt.shape
    dev = full_cnt.device
    diag = torch.arange(nb, dtype=torch.int32, device=dev).view(1, 1, nb, 1)
    part_idx = F.pad(diag, (0, nb - 1)).expand(B, H, nb, nb)
    kv = KVBlocks(torch.ones(B, H, nb, dtype=torch.int32, device=dev), part_idx, full_cnt, full_idx)
    return VSResult(kv, density, rec, sd)


def _resolve_stats(stats: str, q: Tensor) -> str:
    if stats not in STATS_BACKENDS and stats != "auto":
        raise ConfigError(f"vertical-slash stats backend must be auto, {' or '.join(STATS_BACKENDS)} (got {stats!r})")
    if stats == "auto":
        return "triton" if q.is_cuda and triton_can_run(q.device) else "eager"
    if stats == "triton" and not triton_can_run(q.device):
        raise ConfigError("the triton vertical-slash statistics need CUDA (or TRITON_INTERPRET=1) and triton")
    return stats


def _inputs(q: Tensor, k: Tensor, c: dict[str, Tensor], group: int, stats: str) -> tuple[Tensor, Tensor]:
    """The two inputs of a stats backend: eager (float32/64 rows grouped per key head, reversed keys) or triton
    (the selected query rows and the key heads in the input dtype, natural order)."""
    if stats == "eager":
        return _select(q, k, c, group, torch.float64 if q.dtype == torch.float64 else torch.float32)
    kv = _key_heads(k, q.shape[1], group)
    return q.index_select(2, c["pos_rows"]).contiguous(), kv.contiguous()


#: How the column, diagonal and check-row sums are computed: ``eager`` (torch, float32 probabilities of every
#: selected row in memory) or ``triton`` (two fused launches, :mod:`.vertical_slash_triton`).
STATS_BACKENDS = {"eager": _core, "triton": _core_triton}


@torch.no_grad()
def vertical_slash_fast(q: Tensor, k: Tensor, knob: Tensor, scale: float, rows: Tensor,
                        params: VSParams = VSParams(), group: int = 1, stats: str = "auto") -> VSResult:
    """Eager fast path: q (B, H, N, D); k (B, H, N, D) with keys repeated per query head (``group`` query heads
    per key head) or (B, H // group, N, D); knob (H,) scale on (vertical_size, slash_size); ``rows`` (R,)
    held-out query rows for the recall check; ``stats`` one of :data:`STATS_BACKENDS` or ``auto`` (triton on
    CUDA when importable). Float64 inputs stay float64 (the eager backend)."""
    _check(q, k, params, rows)
    stats = _resolve_stats(stats, q)
    c = _constants(q.shape[2], rows, params, q.device)
    dt = torch.float64 if q.dtype == torch.float64 else torch.float32
    with lossless_tf32(q.dtype, q.device):
        a, b = _inputs(q, k, c, group, stats)
        return _wrap(*STATS_BACKENDS[stats](a, b, knob.to(dt), c, params, scale, group))


class VerticalSlashPlan:
    """One shape's fast path: static buffers and (on CUDA) a CUDA graph of the stats backend and the pattern.
    ``run`` copies the call's query rows, key heads and knob in, replays, and returns cloned outputs."""

    def __init__(self, q: Tensor, k: Tensor, scale: float, rows: Tensor, params: VSParams, group: int,
                 use_graph: bool = True, stats: str = "auto"):
        _check(q, k, params, rows)
        self.params, self.scale, self.group = params, scale, group
        self.dev, self.src_dtype = q.device, q.dtype
        self.stats = _resolve_stats(stats, q)
        self.c = _constants(q.shape[2], rows, params, q.device)
        self.dt = torch.float64 if q.dtype == torch.float64 else torch.float32
        a, b = _inputs(q, k, self.c, group, self.stats)
        self.qsel, self.kf = a.clone(), b.clone()
        self.knob = torch.ones(q.shape[1], dtype=self.dt, device=q.device)
        self.graph: Any = None
        self.outs: tuple[Tensor, ...] | None = None
        self.why_eager = "" if q.is_cuda else "not CUDA"
        if q.is_cuda and use_graph:
            self._capture()
            if self.graph is None and self.stats == "triton":  # e.g. a Triton build that rejects the kernel
                warnings.warn(f"fused vertical-slash statistics failed ({self.why_eager}); using the eager ones")
                self.stats = "eager"
                a, b = _inputs(q, k, self.c, group, "eager")
                self.qsel, self.kf = a.clone(), b.clone()
                self._capture()
        elif q.is_cuda:
            self.why_eager = "graphs off"

    def _run_core(self) -> tuple[Tensor, ...]:
        with lossless_tf32(self.src_dtype, self.dev):
            return STATS_BACKENDS[self.stats](self.qsel, self.kf, self.knob, self.c, self.params, self.scale,
                                              self.group)

    def _capture(self) -> None:
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    self._run_core()
            torch.cuda.current_stream().wait_stream(side)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                self.outs = self._run_core()
            self.graph = g
        except Exception as e:  # pragma: no cover - depends on the driver / torch build
            warnings.warn(f"vertical-slash CUDA graph capture failed ({type(e).__name__}: {e}); running eagerly")
            self.graph, self.outs, self.why_eager = None, None, f"capture failed: {type(e).__name__}"

    @property
    def graphed(self) -> bool:
        """Whether replays run the captured graph."""
        return self.graph is not None

    @torch.no_grad()
    def run(self, q: Tensor, k: Tensor, knob: Tensor) -> VSResult:
        """The pattern, density and check recall for this call's q, k and knob (H,)."""
        kv = _key_heads(k, q.shape[1], self.group)
        rows = q.index_select(2, self.c["pos_rows"])
        self.qsel.copy_(rows.view(self.qsel.shape))  # casts while copying
        self.kf.copy_(kv.flip(2) if self.stats == "eager" else kv)
        self.knob.copy_(knob)
        if self.graph is None:
            return _wrap(*self._run_core())
        self.graph.replay()
        return _wrap(*(t.clone() for t in self.outs))


_PLANS: dict[tuple, VerticalSlashPlan] = {}


def plan_for(q: Tensor, k: Tensor, scale: float, rows: Tensor, params: VSParams, group: int,
             use_graph: bool = True, stats: str = "auto") -> VerticalSlashPlan:
    """The cached plan for this shape (one CUDA graph per (shape, dtype, device, scale, rows, settings))."""
    key = (tuple(q.shape), tuple(k.shape), q.dtype, str(q.device), float(scale), params, group, use_graph,
           tuple(rows.tolist()), stats)
    if key not in _PLANS:
        _PLANS[key] = VerticalSlashPlan(q, k, scale, rows, params, group, use_graph, stats)
    return _PLANS[key]
