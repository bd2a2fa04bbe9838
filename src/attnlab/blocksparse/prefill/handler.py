"""The prefill attention handler: per call, predict a block pattern, run the sparse kernel on the heads below
the break-even density and dense SDPA on the others, time it, and (when measuring) record density, recall on
sampled rows and the output error against exact attention."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from ...errors import ConfigError, ModelError
from ..blockmask import BlockPattern, KVBlocks
from ..flex import run_pattern
from ..recall import pattern_row_recall, row_scores, sample_rows

__all__ = ["PredictFn", "predict_fn", "LayerRecord", "PrefillHandler", "dense_sdpa", "head_density", "sub_pattern"]

#: (q, k, p, block_size, scale) -> (pattern, multiply-adds of the prediction)
PredictFn = Callable[[Tensor, Tensor, float, int, float], tuple[BlockPattern, float]]


def predict_fn(method: Any) -> PredictFn:
    """The handler's prediction function of a block predictor (``method.predict``, causal)."""

    def fn(q: Tensor, k: Tensor, p: float, bs: int, scale: float) -> tuple[BlockPattern, float]:
        pred = method.predict(q, k, causal=True, block_size=bs, p=p, scale=scale)
        return pred.pattern, float(pred.cost)

    return fn


def dense_sdpa(q: Tensor, k: Tensor, v: Tensor, scale: float, backend: str = "cudnn") -> Tensor:
    """Causal SDPA with the named backend ('flash' | 'cudnn' | 'math' | 'auto'); CPU always runs math."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if not q.is_cuda or backend == "auto":
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    be = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
          "math": SDPBackend.MATH, "efficient": SDPBackend.EFFICIENT_ATTENTION}.get(backend)
    if be is None:
        raise ConfigError(f"unknown SDPA backend {backend!r}")
    with sdpa_kernel(be):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)


def head_density(pattern: BlockPattern) -> Tensor:
    """Kept tiles per head / causal tiles nq(nq+1)/2, averaged over the batch: (H,) float32."""
    kv = pattern.kv
    kept = (kv.kv_num_blocks.float() + kv.full_kv_num_blocks.float()).sum(-1).mean(0)
    nq = kv.kv_num_blocks.shape[-1]
    return kept / (nq * (nq + 1) / 2 if pattern.causal else nq * kv.kv_indices.shape[-1])


def sub_pattern(pattern: BlockPattern, heads: Tensor) -> BlockPattern:
    """The pattern restricted to ``heads`` (index tensor over H)."""
    kv = KVBlocks(*(t.index_select(1, heads) for t in pattern.kv))
    perm = (lambda x: None if x is None else x.index_select(1, heads))
    return BlockPattern(kv, pattern.block_size, pattern.causal, perm(pattern.q_perm), perm(pattern.k_perm))


def _pad(x: Tensor, n: int) -> Tensor:
    return x if x.shape[2] == n else torch.nn.functional.pad(x, (0, 0, 0, n - x.shape[2]))


@dataclass
class LayerRecord:
    """What one attention call did (filled when ``measure`` is on)."""

    layer: int
    density: list[float]
    dense_fallback: list[bool]
    recall: list[float] = field(default_factory=list)
    out_error: list[float] = field(default_factory=list)
    prediction_macs: float = 0.0


class PrefillHandler:
    """AttentionInterface handler: mode 'flash' | 'cudnn' (dense SDPA) or 'sparse' (predicted block-sparse,
    dense fallback per head above ``breakeven``). Times each call with CUDA events (CPU: perf_counter)."""

    def __init__(self, mode: str, predict: Optional[PredictFn] = None, recall: float = 0.95, block_size: int = 128,
                 breakeven: Optional[float] = None, measure: bool = False, rows: int = 256, seed: int = 0):
        if mode not in ("flash", "cudnn", "sparse", "auto"):
            raise ConfigError(f"unknown prefill mode {mode!r}")
        self.mode, self.predict, self.p, self.bs = mode, predict, recall, block_size
        self.breakeven, self.measure, self.rows, self.seed = breakeven, measure, rows, seed
        self.records: list[LayerRecord] = []
        self.dense_layers: set[int] = set()  # layers where prediction + sparse kernel measured slower than dense
        self._events: list[tuple[int, Any, Any]] = []
        self._pred_events: list[tuple[Any, Any]] = []
        self._cpu_s = self._cpu_pred_s = 0.0

    def reset(self) -> None:
        """Forget records and times (before a new forward)."""
        self.records, self._events, self._pred_events, self._cpu_s, self._cpu_pred_s = [], [], [], 0.0, 0.0

    def prediction_ms(self) -> float:
        """Time of prediction + per-head decision within the last forward's attention time (synchronises)."""
        if self._pred_events:
            torch.cuda.synchronize()
            return sum(a.elapsed_time(b) for a, b in self._pred_events)
        return self._cpu_pred_s * 1e3

    def attention_ms(self) -> float:
        """Total attention time of the last forward (synchronises)."""
        if self._events:
            torch.cuda.synchronize()
            return sum(a.elapsed_time(b) for _, a, b in self._events)
        return self._cpu_s * 1e3

    def layer_ms(self) -> dict[int, float]:
        """Attention time per layer of the last forward (CUDA only; synchronises)."""
        torch.cuda.synchronize()
        out: dict[int, float] = {}
        for layer, a, b in self._events:
            out[layer] = out.get(layer, 0.0) + a.elapsed_time(b)
        return out

    def __call__(self, call: Any) -> Tensor:
        if call.valid is not None or call.bias is not None or call.softcap:
            raise ModelError("prefill supports plain causal self-attention only: this model passes an explicit "
                             "mask, bias or softcap to its attention (padding, sliding window, ALiBi, ...)")
        q, k, v = call.query, call.key, call.value
        if q.shape[2] != k.shape[2]:
            raise ModelError("prefill needs self-attention over the whole sequence (no KV cache)")
        cuda = q.is_cuda
        if cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
        else:
            t0 = time.perf_counter()
        if call.layer in self.dense_layers:
            out, pattern, dense_heads, dens, macs = dense_sdpa(q, k, v, call.scaling), None, None, None, 0.0
        else:
            out, pattern, dense_heads, dens, macs = self._attend(q, k, v, call.scaling)
        if cuda:
            b.record()
            self._events.append((call.layer, a, b))
        else:
            self._cpu_s += time.perf_counter() - t0
        if self.measure:
            self._record(call.layer, q, k, v, call.scaling, out, pattern, dense_heads, dens, macs)
        return out

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, scale: float):
        if self.mode != "sparse":
            return dense_sdpa(q, k, v, scale, self.mode), None, None, None, 0.0
        B, H, N, D = q.shape
        n = -(-N // self.bs) * self.bs  # pad to a multiple of the block size (causal: padding is never seen)
        qp, kp, vp = _pad(q, n), _pad(k, n), _pad(v, n)
        if q.is_cuda:
            a = torch.cuda.Event(enable_timing=True)
            a.record()
        else:
            t0 = time.perf_counter()
        pattern, macs = self.predict(qp, kp, self.p, self.bs, scale)
        dens = head_density(pattern)
        if self.breakeven is None:
            dense_heads = torch.zeros(H, dtype=torch.bool)
        else:
            dense_heads = (dens > self.breakeven).cpu()  # one small host sync per layer
        if q.is_cuda:
            b = torch.cuda.Event(enable_timing=True)
            b.record()
            self._pred_events.append((a, b))
        else:
            self._cpu_pred_s += time.perf_counter() - t0
        nd = int(dense_heads.sum())
        if nd == H:
            out = dense_sdpa(q, k, v, scale)
        elif nd == 0:
            out = run_pattern(qp, kp, vp, pattern, "auto", scale)[:, :, :N]
        else:
            sp = (~dense_heads).nonzero().flatten().to(q.device)
            dn = dense_heads.nonzero().flatten().to(q.device)
            out = torch.empty_like(q)
            out[:, sp] = run_pattern(qp[:, sp], kp[:, sp], vp[:, sp], sub_pattern(pattern, sp), "auto", scale)[:, :, :N]
            out[:, dn] = dense_sdpa(q[:, dn], k[:, dn], v[:, dn], scale)
        return out, pattern, dense_heads, dens, macs

    @torch.no_grad()
    def _record(self, layer: int, q: Tensor, k: Tensor, v: Tensor, scale: float, out: Tensor,
                pattern: Optional[BlockPattern], dense_heads: Optional[Tensor], dens: Optional[Tensor],
                macs: float) -> None:
        B, H, N, D = q.shape
        rows = sample_rows(N, self.rows, self.seed + 1000 * layer + 1, None, q.device)
        dt = torch.float64 if not q.is_cuda else torch.float32
        prob = torch.softmax(row_scores(q, k, rows, True, scale, dt), dim=-1)  # (B, H, R, N)
        ref = torch.matmul(prob, v.to(dt))  # exact dense output of these rows
        if pattern is None:
            rec = torch.ones(H, dtype=torch.float64)
            dens_l, fb = [1.0] * H, [True] * H
        else:
            rec = pattern_row_recall(pattern, rows, row_probs=prob, dense_heads=dense_heads).mean(dim=(0, 2))
            dens_l, fb = dens.tolist(), dense_heads.tolist()
        diff = (out[:, :, rows].to(dt) - ref).transpose(0, 1).reshape(H, -1)
        err = diff.norm(dim=-1) / ref.transpose(0, 1).reshape(H, -1).norm(dim=-1).clamp_min(1e-30)
        self.records.append(LayerRecord(layer, [float(x) for x in dens_l], [bool(x) for x in fb],
                                        [float(x) for x in rec.tolist()], [float(x) for x in err.tolist()], macs))
