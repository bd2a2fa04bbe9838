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
from ..blockmask import BlockPattern, KVBlocks, band_block_graph, pattern_from_block_graph, window_pattern
from ..flex import run_pattern
from ..recall import pattern_row_recall, sample_rows
from .window import effective_window, windowed_oracle, windowed_row_scores

__all__ = ["PredictFn", "predict_fn", "LayerRecord", "PrefillHandler", "dense_sdpa", "head_density", "sparse_with_lse",
           "sub_pattern"]

#: (q, k, p, block_size, scale) -> (pattern, multiply-adds of the prediction)
PredictFn = Callable[[Tensor, Tensor, float, int, float], tuple[BlockPattern, float]]


def predict_fn(method: Any) -> PredictFn:
    """The handler's prediction function of a block predictor (``method.predict``, causal). On a layer with a
    sliding window or softcapped scores the oracle takes its exact mass from that attention
    (:func:`~attnlab.blocksparse.prefill.window.windowed_oracle`); other predictors estimate from q and k as
    usual and the handler intersects their pattern with the window."""
    from ..predictors.oracle import OracleBlocks

    def fn(q: Tensor, k: Tensor, p: float, bs: int, scale: float, window: Optional[int] = None,
           softcap: Optional[float] = None) -> tuple[BlockPattern, float]:
        if isinstance(method, OracleBlocks) and (window is not None or softcap):
            return windowed_oracle(method, q, k, p, bs, scale, window, softcap)
        pred = method.predict(q, k, causal=True, block_size=bs, p=p, scale=scale)
        return pred.pattern, float(pred.cost)

    fn.wants_window = True  # type: ignore[attr-defined]
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
    """Kept tiles per head / the tiles dense attention computes (causal nq(nq+1)/2; with a sliding window the
    tiles the window touches), averaged over the batch: (H,) float32."""
    kv = pattern.kv
    kept = (kv.kv_num_blocks.float() + kv.full_kv_num_blocks.float()).sum(-1).mean(0)
    nq = kv.kv_num_blocks.shape[-1]
    if pattern.window is not None:
        return kept / float(band_block_graph(nq, pattern.block_size, pattern.window)[0].sum())
    return kept / (nq * (nq + 1) / 2 if pattern.causal else nq * kv.kv_indices.shape[-1])


def band_pattern(B: int, H: int, n: int, block_size: int, window: Optional[int],
                 device: torch.device) -> BlockPattern:
    """Every causal tile of length ``n`` (padded), intersected with the sliding window (None: plain causal)."""
    nq = n // block_size
    g = torch.ones(B, H, nq, nq, dtype=torch.bool, device=device)
    return window_pattern(pattern_from_block_graph(g, block_size, True), window)


def sub_pattern(pattern: BlockPattern, heads: Tensor) -> BlockPattern:
    """The pattern restricted to ``heads`` (index tensor over H)."""
    kv = KVBlocks(*(t.index_select(1, heads) for t in pattern.kv))
    perm = (lambda x: None if x is None else x.index_select(1, heads))
    return BlockPattern(kv, pattern.block_size, pattern.causal, perm(pattern.q_perm), perm(pattern.k_perm),
                        pattern.window)


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
    predictor_info: dict = field(default_factory=dict)


class PrefillHandler:
    """AttentionInterface handler: mode 'flash' | 'cudnn' (dense SDPA) or 'sparse' (predicted block-sparse,
    dense fallback above ``breakeven``). Times each call with CUDA events (CPU: perf_counter).

    ``head_policy``: 'layer' (default) runs a layer dense when its heads' mean predicted density is above the
    break-even (kernel time grows about linearly with density, so this is the cheaper side), else every head
    sparse; 'head' splits each layer into sparse and dense heads (gathers q/k/v per subset, and each subset
    size compiles its own kernel). ``kernel_options``: FlexAttention's (None: its own choice).
    ``remainder``: 'none', or a method of :mod:`attnlab.blocksparse.remainder` that adds an estimate of the
    skipped tiles' contribution to the sparse output (FlexAttention then also returns its log-sum-exp)."""

    def __init__(self, mode: str, predict: Optional[PredictFn] = None, recall: float = 0.95, block_size: int = 128,
                 breakeven: Optional[float] = None, measure: bool = False, rows: int = 256, seed: int = 0,
                 head_policy: str = "layer", kernel_options: Optional[dict] = None, remainder: str = "none",
                 windows: Optional[list] = None):
        if mode not in ("flash", "cudnn", "sparse", "auto"):
            raise ConfigError(f"unknown prefill mode {mode!r}")
        if head_policy not in ("layer", "head"):
            raise ConfigError(f"unknown head policy {head_policy!r}")
        self.mode, self.predict, self.p, self.bs = mode, predict, recall, block_size
        self.breakeven, self.measure, self.rows, self.seed = breakeven, measure, rows, seed
        self.head_policy, self.kernel_options, self.remainder = head_policy, kernel_options, remainder
        self.windows = windows  # per layer from the config (None: not checked); the call's own window runs
        from .window import MaskProbe

        self.mask_probe = MaskProbe()  # the prefill mask function: checks the model's masks, builds none
        self.layer_windows: dict[int, Optional[int]] = {}  # effective window each layer ran with
        self.records: list[LayerRecord] = []
        self.dense_layers: set[int] = set()  # layers where prediction + sparse kernel measured slower than dense
        self._events: list[tuple[int, Any, Any]] = []
        self._pred_events: list[tuple[int, Any, Any]] = []
        self._cpu_s = self._cpu_pred_s = 0.0

    def reset(self) -> None:
        """Forget records and times (before a new forward)."""
        self.records, self._events, self._pred_events, self._cpu_s, self._cpu_pred_s = [], [], [], 0.0, 0.0

    def prediction_ms(self) -> float:
        """Time of prediction + per-head decision within the last forward's attention time (synchronises)."""
        if self._pred_events:
            torch.cuda.synchronize()
            return sum(a.elapsed_time(b) for _, a, b in self._pred_events)
        return self._cpu_pred_s * 1e3

    def layer_prediction_ms(self) -> dict[int, float]:
        """Prediction time per layer of the last forward (CUDA only; synchronises)."""
        return _per_layer_ms(self._pred_events)

    def attention_ms(self) -> float:
        """Total attention time of the last forward (synchronises)."""
        if self._events:
            torch.cuda.synchronize()
            return sum(a.elapsed_time(b) for _, a, b in self._events)
        return self._cpu_s * 1e3

    def layer_ms(self) -> dict[int, float]:
        """Attention time per layer of the last forward (CUDA only; synchronises)."""
        return _per_layer_ms(self._events)

    def _window(self, call: Any, n: int) -> Optional[int]:
        """The call's effective sliding window at length ``n``, checked against the config's and the masks'."""
        w = effective_window(getattr(call, "window", None), n)
        if self.windows is not None and call.layer < len(self.windows):
            wc = effective_window(self.windows[call.layer], n)
            if wc != w:
                raise ModelError(f"layer {call.layer}: the model passes sliding_window={getattr(call, 'window', None)}"
                                 f" to its attention but its config gives {self.windows[call.layer]}")
        seen = {effective_window(x, n) for x in self.mask_probe.windows}
        if seen and w not in seen:
            raise ModelError(f"layer {call.layer}: sliding window {w} is not among the windows of the model's masks "
                             f"({sorted(seen, key=str)})")
        return w

    def __call__(self, call: Any) -> Tensor:
        if call.valid is not None or call.bias is not None:
            raise ModelError("prefill supports causal self-attention (optionally sliding-window and softcapped) "
                             "only: this model passes an explicit mask or bias to its attention (padding, ALiBi, ...)")
        q, k, v = call.query, call.key, call.value
        if q.shape[2] != k.shape[2]:
            raise ModelError("prefill needs self-attention over the whole sequence (no KV cache)")
        window, softcap = self._window(call, q.shape[2]), (call.softcap or None)
        self.layer_windows[call.layer] = window
        if window is not None and self.remainder != "none":
            raise ConfigError(f"--remainder {self.remainder}: not supported on sliding-window layers (layer "
                              f"{call.layer}, window {window})")
        cuda = q.is_cuda
        if cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
        else:
            t0 = time.perf_counter()
        if call.layer in self.dense_layers:
            out, pattern, dense_heads, dens, macs = (self._dense(q, k, v, call.scaling, "cudnn", window, softcap),
                                                     None, None, None, 0.0)
        else:
            out, pattern, dense_heads, dens, macs = self._attend(q, k, v, call.scaling, call.layer, window, softcap)
        if cuda:
            b.record()
            self._events.append((call.layer, a, b))
        else:
            self._cpu_s += time.perf_counter() - t0
        if self.measure:
            self._record(call.layer, q, k, v, call.scaling, out, pattern, dense_heads, dens, macs, window, softcap)
        return out

    def _dense(self, q: Tensor, k: Tensor, v: Tensor, scale: float, backend: str, window: Optional[int] = None,
               softcap: Optional[float] = None) -> Tensor:
        """Dense attention as the model computes it: causal SDPA, or with a sliding window / softcap every tile
        of the window band (FlexAttention with the softcap score_mod on CUDA, the exact masked path on CPU)."""
        if window is None and not softcap:
            return dense_sdpa(q, k, v, scale, backend)
        B, H, N, _ = q.shape
        n = -(-N // self.bs) * self.bs
        band = band_pattern(B, H, n, self.bs, window, q.device)
        return run_pattern(_pad(q, n), _pad(k, n), _pad(v, n), band, "auto", scale, softcap=softcap,
                           kernel_options=self.kernel_options)[:, :, :N]

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, scale: float, layer: int = 0, window: Optional[int] = None,
                softcap: Optional[float] = None):
        if self.mode != "sparse":
            return self._dense(q, k, v, scale, self.mode, window, softcap), None, None, None, 0.0
        B, H, N, D = q.shape
        n = -(-N // self.bs) * self.bs  # pad to a multiple of the block size (causal: padding is never seen)
        qp, kp, vp = _pad(q, n), _pad(k, n), _pad(v, n)
        if q.is_cuda:
            a = torch.cuda.Event(enable_timing=True)
            a.record()
        else:
            t0 = time.perf_counter()
        kw: dict = {"layer": layer} if getattr(self.predict, "wants_layer", False) else {}
        if getattr(self.predict, "wants_window", False):
            kw.update(window=window, softcap=softcap)
        pattern, macs = self.predict(qp, kp, self.p, self.bs, scale, **kw)
        if window is not None and pattern.window != window:  # tiles outside the window are never computed
            pattern = window_pattern(pattern, window)
        dens = head_density(pattern)
        if self.breakeven is None:
            dense_heads = torch.zeros(H, dtype=torch.bool)
        else:
            dc = dens.cpu()  # one small host sync per layer
            if self.head_policy == "layer":
                dense_heads = torch.full((H,), bool(dc.mean() > self.breakeven))
            else:
                dense_heads = dc > self.breakeven
        if q.is_cuda:
            b = torch.cuda.Event(enable_timing=True)
            b.record()
            self._pred_events.append((layer, a, b))
        else:
            self._cpu_pred_s += time.perf_counter() - t0
        nd = int(dense_heads.sum())
        if nd == H:
            out = self._dense(q, k, v, scale, "cudnn", window, softcap)
        elif nd == 0:
            out = self._sparse(qp, kp, vp, pattern, scale, softcap)[:, :, :N]
        else:
            sp = (~dense_heads).nonzero().flatten().to(q.device)
            dn = dense_heads.nonzero().flatten().to(q.device)
            out = torch.empty_like(q)
            out[:, sp] = self._sparse(qp[:, sp], kp[:, sp], vp[:, sp], sub_pattern(pattern, sp), scale,
                                      softcap)[:, :, :N]
            out[:, dn] = self._dense(q[:, dn], k[:, dn], v[:, dn], scale, "cudnn", window, softcap)
        return out, pattern, dense_heads, dens, macs

    def _sparse(self, q: Tensor, k: Tensor, v: Tensor, pattern: BlockPattern, scale: float,
                softcap: Optional[float] = None) -> Tensor:
        """The sparse kernel on ``pattern``; with a remainder method, plus its estimate of the skipped tiles."""
        if self.remainder == "none":
            return run_pattern(q, k, v, pattern, "auto", scale, kernel_options=self.kernel_options, softcap=softcap)
        if softcap:
            raise ConfigError(f"--remainder {self.remainder}: not supported with softcapped scores")
        from ..remainder import add_remainder  # lazy: written in its own branch (issue 28)

        if pattern.permuted:
            raise ConfigError(f"--remainder {self.remainder}: needs a pattern in token order (not a clustered one)")
        out, lse = sparse_with_lse(q, k, v, pattern, scale, self.kernel_options)
        keep = pattern.block_graph()  # (B, H, nq, nk) bool: the tiles that were executed
        return add_remainder(q, k, v, keep, pattern.block_size, out, lse, self.remainder, scale=scale)


    @torch.no_grad()
    def _record(self, layer: int, q: Tensor, k: Tensor, v: Tensor, scale: float, out: Tensor,
                pattern: Optional[BlockPattern], dense_heads: Optional[Tensor], dens: Optional[Tensor],
                macs: float, window: Optional[int] = None, softcap: Optional[float] = None) -> None:
        B, H, N, D = q.shape
        rows = sample_rows(N, self.rows, self.seed + 1000 * layer + 1, None, q.device)
        dt = torch.float64 if not q.is_cuda else torch.float32
        # exact attention as the model computes it (softcap, causal, sliding window): recall's and error's reference
        prob = torch.softmax(windowed_row_scores(q, k, rows, scale, dt, window, softcap), dim=-1)  # (B, H, R, N)
        ref = torch.matmul(prob, v.to(dt))  # exact dense output of these rows
        if pattern is None:
            rec = torch.ones(H, dtype=torch.float64)
            dens_l, fb = [1.0] * H, [True] * H
        else:
            rec = pattern_row_recall(pattern, rows, row_probs=prob, dense_heads=dense_heads).mean(dim=(0, 2))
            dens_l, fb = dens.tolist(), dense_heads.tolist()
        diff = (out[:, :, rows].to(dt) - ref).transpose(0, 1).reshape(H, -1)
        err = diff.norm(dim=-1) / ref.transpose(0, 1).reshape(H, -1).norm(dim=-1).clamp_min(1e-30)
        info = dict(getattr(self.predict, "last_info", None) or {}) if pattern is not None else {}
        self.records.append(LayerRecord(layer, [float(x) for x in dens_l], [bool(x) for x in fb],
                                        [float(x) for x in rec.tolist()], [float(x) for x in err.tolist()], macs,
                                        info))


def sparse_with_lse(q: Tensor, k: Tensor, v: Tensor, pattern: BlockPattern, scale: float,
                    kernel_options: Optional[dict] = None) -> tuple[Tensor, Tensor]:
    """(output, natural log-sum-exp (B, H, N), float32 or float64 for float64 inputs) of attention restricted to
    ``pattern`` (token order):
    FlexAttention with ``return_lse=True`` on CUDA, the exact masked reference elsewhere."""
    from ..flex import compiled_flex_attention, flex_available

    if flex_available(q.device):
        flex = compiled_flex_attention()
        out, lse = flex(q, k, v, block_mask=pattern.block_mask(), scale=scale, kernel_options=kernel_options,
                        return_lse=True)
        return out, lse.float()
    dt = torch.float64 if q.dtype == torch.float64 else torch.float32
    s = torch.matmul(q.to(dt), k.to(dt).transpose(-1, -2)) * scale
    s = s.masked_fill(~pattern.token_mask(), float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    return torch.matmul(torch.softmax(s, dim=-1), v.to(dt)).to(q.dtype), lse


def _per_layer_ms(events: list) -> dict[int, float]:
    """Sum of CUDA-event intervals per layer, from (layer, start, end) records (synchronises)."""
    torch.cuda.synchronize()
    out: dict[int, float] = {}
    for layer, a, b in events:
        out[layer] = out.get(layer, 0.0) + a.elapsed_time(b)
    return out
