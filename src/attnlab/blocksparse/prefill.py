"""Sparse prefill of a real causal HF model: every attention layer replaced by predicted block-sparse attention.

``run_prefill(PrefillConfig(model=..., seq_len=N, predictor=NAME, recall=p))`` loads the model, takes held-out
text windows of N tokens and runs the model's own forward with each self-attention call routed (through
transformers' ``AttentionInterface``, :func:`attnlab.sources.hf.attention_hooks`) to a handler that

1. predicts a block pattern per layer and head from that call's q and k (a block predictor by name, aiming at
   mean mass recall ``p`` per head);
2. runs FlexAttention on the heads whose predicted density is below the kernel's measured break-even density,
   and dense SDPA (cuDNN) on the others, so no head runs slower than dense;
3. returns that output to the model.

It reports, per layer and head, the density, the recall measured as exact softmax mass kept on sampled query
rows, and the output error against exact dense attention (all on that layer's real inputs); for the whole
forward, the held-out loss against the dense forward and wall times (attention alone, prediction and mask
building included, and the whole forward) against SDPA with the FlashAttention and cuDNN backends. On CPU the
exact masked path runs instead of the kernel and timings are not meaningful (a notice says so).

Under ``torchrun`` the held-out windows are sharded round-robin over ranks (one GPU each): every rank measures
its windows, rank 0's break-even density and dense-layer decision are broadcast so every rank runs the same
policy, and per-window records and timing samples are gathered back in window order, so the numbers equal a
single process's (timings aside).
"""

from __future__ import annotations

import contextlib
import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator, Optional

import torch
from torch import Tensor

from ..distributed import (DistInfo, barrier, broadcast_object, device_for, gather_lists, gather_ordered,
                           init_distributed, require_work_per_rank, shard_indices)
from ..errors import ConfigError, ModelError
from ..timing import time_ms
from .blockmask import BlockPattern, KVBlocks, block_graph_to_kv
from .flex import run_pattern

NOTICE_CPU = "no CUDA: the exact masked path ran instead of FlexAttention; timings are not meaningful"


@dataclass(frozen=True)
class PrefillConfig:
    """Settings of one sparse-prefill measurement."""

    model: str
    seq_len: int = 16384
    predictor: str = "pooled"
    recall: float = 0.95
    block_size: int = 128
    windows: int = 2
    rows: int = 256
    reps: int = 3
    fallback: bool = True
    device: str = "auto"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.seq_len < 2:
            raise ConfigError(f"--seq-len must be >= 2, got {self.seq_len}")
        if not 0.0 < self.recall <= 1.0:
            raise ConfigError(f"--recall must be in (0, 1], got {self.recall}")
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise ConfigError(f"--block-size must be a power of two >= 16, got {self.block_size}")
        for name in ("windows", "rows", "reps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name} must be >= 1, got {getattr(self, name)}")


# ------------------------------------------------------------------------------------------------------------
# Predictors by name: the block-predictor registry (attnlab.blocksparse.predictors: oracle, MInference, XAttention,
# FlexPrefill, pooled, cluster, ...) plus 'full' (every causal tile: the equivalence check).
# ------------------------------------------------------------------------------------------------------------

#: (q, k, p, block_size, scale) -> (pattern, multiply-adds of the prediction)
PredictFn = Callable[[Tensor, Tensor, float, int, float], tuple[BlockPattern, float]]


def _registry() -> Any:
    from .predictors import BLOCK_PREDICTORS

    return BLOCK_PREDICTORS


def _full(q: Tensor, k: Tensor, p: float, bs: int, scale: float) -> tuple[BlockPattern, float]:
    B, H, N, _ = q.shape
    nb = N // bs
    g = torch.ones(nb, nb, dtype=torch.bool, device=q.device).tril_().expand(B, H, nb, nb)
    return BlockPattern(block_graph_to_kv(g, True), bs, True), 0.0


_BUILTIN: dict[str, PredictFn] = {"full": _full}


def predictor_names() -> list[str]:
    """Every name ``--predictor`` accepts: the block-predictor registry's plus 'full' (keep every tile)."""
    names = list(_registry().names())
    return names + [n for n in _BUILTIN if n not in names]


def make_predictor(name: str, **options: Any) -> PredictFn:
    """The prediction function for ``--predictor name`` (registry first, then the built-ins)."""
    reg = _registry()
    if name not in _BUILTIN and name in reg:
        method = reg.get(name)(**options)

        def fn(q: Tensor, k: Tensor, p: float, bs: int, scale: float) -> tuple[BlockPattern, float]:
            pred = method.predict(q, k, causal=True, block_size=bs, p=p, scale=scale)
            return pred.pattern, float(pred.cost)

        return fn
    if name in _BUILTIN:
        if options:
            raise ConfigError(f"--predictor {name}: takes no options, got {sorted(options)}")
        return _BUILTIN[name]
    raise ConfigError(f"--predictor: unknown block predictor {name!r}; choose from {', '.join(predictor_names())}")


# ------------------------------------------------------------------------------------------------------------
# Dense baselines, head subsets, densities
# ------------------------------------------------------------------------------------------------------------


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


# ------------------------------------------------------------------------------------------------------------
# Kernel break-even density (measured once per (N, H, head_dim, dtype, device) in this process)
# ------------------------------------------------------------------------------------------------------------

_BREAKEVEN: dict[tuple, dict] = {}


def _cuda_time(fn: Callable[[], Any], reps: int = 5) -> float:
    return statistics.median(time_ms(fn, "cuda", reps, warmup=1))


def _random_causal_pattern(B: int, H: int, nb: int, density: float, bs: int, device: Any, seed: int = 0) -> BlockPattern:
    """Random causal tile pattern with about ``density`` of the causal tiles (diagonal always kept)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    r = torch.rand(B, H, nb, nb, generator=g).to(device)
    tril = torch.ones(nb, nb, dtype=torch.bool, device=device).tril_()
    keep = ((r < density) & tril) | torch.eye(nb, dtype=torch.bool, device=device)
    return BlockPattern(block_graph_to_kv(keep, True), bs, True)


@torch.no_grad()
def breakeven_density(n: int, n_heads: int, head_dim: int, dtype: torch.dtype, device: Any, block_size: int = 128,
                      grid: tuple[float, ...] = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)) -> dict:
    """Largest causal-tile density at which FlexAttention (kernel only) is faster than cuDNN causal SDPA on
    random q, k, v of this shape (linear interpolation between grid points); times per density included.
    Cached per (n, n_heads, head_dim, dtype, device) for the process."""
    key = (n, n_heads, head_dim, str(dtype), str(device), block_size)
    if key in _BREAKEVEN:
        return _BREAKEVEN[key]
    g = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (torch.randn(1, n_heads, n, head_dim, generator=g).to(device=device, dtype=dtype) for _ in range(3))
    scale = head_dim ** -0.5
    t_dense = _cuda_time(lambda: dense_sdpa(q, k, v, scale, "cudnn"))
    nb = n // block_size
    curve = []
    for d in grid:
        pat = _random_causal_pattern(1, n_heads, nb, d, block_size, device)
        bm = pat.block_mask()
        real = float(head_density(pat).mean())
        t = _cuda_time(lambda: run_pattern(q, k, v, pat, "flex", scale, block_mask=bm))
        curve.append({"density": real, "flex_ms": t, "speedup_vs_cudnn": t_dense / t,
                      "efficiency": (t_dense / t) * real})
    be = 0.0
    prev = None
    for c in curve:
        if c["flex_ms"] < t_dense:
            be = c["density"]
            prev = c
            continue
        if prev is not None:  # interpolate between the last faster and the first slower point
            f = (t_dense - prev["flex_ms"]) / max(1e-12, c["flex_ms"] - prev["flex_ms"])
            be = prev["density"] + f * (c["density"] - prev["density"])
        break
    res = {"breakeven": be, "cudnn_ms": t_dense, "curve": curve, "n": n, "heads": n_heads, "head_dim": head_dim}
    _BREAKEVEN[key] = res
    return res


# ------------------------------------------------------------------------------------------------------------
# The attention handler
# ------------------------------------------------------------------------------------------------------------


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
        g = torch.Generator().manual_seed(self.seed + 1000 * layer + 1)
        rows = torch.randperm(N, generator=g)[: min(self.rows, N)].sort().values.to(q.device)
        dt = torch.float64 if not q.is_cuda else torch.float32
        s = torch.matmul(q[:, :, rows].to(dt), k.to(dt).transpose(-1, -2)) * scale  # (B, H, R, N)
        fut = torch.arange(N, device=q.device).view(1, 1, 1, N) > rows.view(1, 1, -1, 1)
        prob = torch.softmax(s.masked_fill(fut, float("-inf")), dim=-1)
        ref = torch.matmul(prob, v.to(dt))  # exact dense output of these rows
        if pattern is None:
            rec = torch.ones(H, dtype=torch.float64)
            dens_l, fb = [1.0] * H, [True] * H
        else:
            allowed = pattern.allowed_rows(rows)[..., :N] | dense_heads.to(q.device).view(1, H, 1, 1)
            rec = (prob * allowed).sum(-1).mean(dim=(0, 2))
            dens_l, fb = dens.tolist(), dense_heads.tolist()
        diff = (out[:, :, rows].to(dt) - ref).transpose(0, 1).reshape(H, -1)
        err = diff.norm(dim=-1) / ref.transpose(0, 1).reshape(H, -1).norm(dim=-1).clamp_min(1e-30)
        self.records.append(LayerRecord(layer, [float(x) for x in dens_l], [bool(x) for x in fb],
                                        [float(x) for x in rec.tolist()], [float(x) for x in err.tolist()], macs))


# ------------------------------------------------------------------------------------------------------------
# Model, data, forward
# ------------------------------------------------------------------------------------------------------------


def load_causal_model(name: str, device: torch.device, dtype: torch.dtype) -> Any:
    """Load a causal HF LM and check that its attention routes through AttentionInterface."""
    from ..sources.hf import attention_modules, load_model, resolve_model_path

    from ..sources.families import refuse_for_prefill

    refuse_for_prefill(name, resolve_model_path(name))  # families read by an adapter or not at all: one line
    hf = load_model(name, device=str(device), dtype=dtype, head="causal-lm")  # causality: from the probe
    if not hf.causal:
        raise ConfigError(f"--model {name}: not a causal language model (prefill needs causal self-attention; "
                          "encoders such as BERT attend both ways)")
    attention_modules(hf)  # ModelError when no layer routes through AttentionInterface
    return hf


@contextlib.contextmanager
def prefill_hooks(hf: Any, handler: PrefillHandler) -> Iterator[None]:
    """Route every attention layer to ``handler``; the causal mask is skipped (no N x N tensor), as SDPA does."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask, sdpa_mask

    from ..sources.hf import IMPL_NAME, attention_hooks

    with attention_hooks(hf, handler):
        ALL_MASK_ATTENTION_FUNCTIONS.register(IMPL_NAME, sdpa_mask)
        try:
            yield
        finally:
            ALL_MASK_ATTENTION_FUNCTIONS.register(IMPL_NAME, eager_mask)


def heldout_windows(hf: Any, seq_len: int, count: int) -> Tensor:
    """``count`` held-out windows (count, seq_len) of token ids: the byte-level model's own held-out split when
    the folder holds attnlab_lm.json, else held-out stdlib documents through the model's tokenizer."""
    from ..lm.data import EOS_ID, OFFSET, load_corpus, windows
    from ..lm.train import read_meta

    meta = read_meta(hf.name)
    need = seq_len * count + 1
    if meta is not None:
        cfg = meta["config"]
        keep = 2 * max(cfg.get("seq_len", 0), cfg.get("long_seq_len", 0))  # the split training used
        corpus = load_corpus(cfg.get("corpus"), cfg.get("heldout_frac", 0.05), cfg.get("max_bytes"),
                             min_heldout_tokens=keep)
        stream = corpus.heldout
    else:
        corpus = load_corpus(None, 0.05, None, min_heldout_tokens=need * 8)
        raw = torch.where(corpus.heldout == EOS_ID, torch.full_like(corpus.heldout, 10 + OFFSET), corpus.heldout)
        text = bytes((raw - OFFSET).clamp(0, 255).to(torch.uint8).tolist()).decode("utf-8", "replace")
        ids = hf.tokenizer(text[: need * 16], add_special_tokens=False)["input_ids"]
        stream = torch.tensor(ids, dtype=torch.long)
    if stream.numel() < need:
        raise ConfigError(f"--seq-len {seq_len} x --windows {count}: only {stream.numel()} held-out tokens")
    return windows(stream, seq_len, count, contiguous=True)


def _loss(logits: Tensor, ids: Tensor) -> float:
    return float(torch.nn.functional.cross_entropy(logits[0, :-1].float(), ids[0, 1:].to(logits.device)))


def _forward(hf: Any, handler: PrefillHandler, ids: Tensor) -> tuple[Tensor, float, float]:
    """One forward through ``handler``: (logits, attention ms, whole-forward ms); the handler keeps the
    prediction share (``prediction_ms``)."""
    handler.reset()
    cuda = ids.is_cuda
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    with prefill_hooks(hf, handler), torch.no_grad():
        logits = hf.model(input_ids=ids, use_cache=False).logits
    if cuda:
        torch.cuda.synchronize()
    total = (time.perf_counter() - t0) * 1e3
    return logits, handler.attention_ms(), total


def _spread(xs: list[float]) -> dict[str, float]:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def run_prefill(cfg: PrefillConfig, log: Optional[Callable[[str], None]] = None, hf: Any = None,
                ids: Optional[Tensor] = None, info: Optional[DistInfo] = None) -> dict:
    """Measure sparse prefill (see module docstring); returns a JSON-friendly dict (the same on every rank under
    torchrun). ``hf`` / ``ids`` may pass an already loaded model and (windows, N) token ids."""
    if cfg.device == "auto":
        dev_name = "cuda" if torch.cuda.is_available() else "cpu"
    else:
        dev_name = cfg.device
        if dev_name.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(f"--device {cfg.device}: CUDA is not available here")
    info = info or init_distributed(dev_name)
    device = torch.device(device_for(info, dev_name))
    log = (log or (lambda s: None)) if info.is_main else (lambda s: None)
    cuda = device.type == "cuda"
    predict = make_predictor(cfg.predictor)
    if hf is None:
        hf = load_causal_model(cfg.model, device, torch.bfloat16 if cuda else torch.float32)
    elif not hf.causal:
        raise ConfigError(f"--model {hf.name}: not a causal language model")
    if cfg.seq_len > hf.max_len:
        raise ConfigError(f"--seq-len {cfg.seq_len} exceeds the model's max_position_embeddings {hf.max_len}")
    notices = []
    if not cuda:
        notices.append(NOTICE_CPU)
        log(f"notice: {NOTICE_CPU}")
    if ids is None:
        ids = heldout_windows(hf, cfg.seq_len, cfg.windows)
    if ids.shape[1] != cfg.seq_len:
        raise ConfigError(f"token windows have length {ids.shape[1]}, not --seq-len {cfg.seq_len}")
    require_work_per_rank(ids.shape[0], info, "--windows")
    ids = ids.to(device)
    dtype = next(hf.model.parameters()).dtype
    n_pad = -(-cfg.seq_len // cfg.block_size) * cfg.block_size
    if n_pad != cfg.seq_len:
        notices.append(f"--seq-len {cfg.seq_len} is not a multiple of --block-size {cfg.block_size}: q, k, v are "
                       f"zero-padded to {n_pad} inside each attention call (causal: padding is never attended)")
    be = None
    if cuda and cfg.fallback:  # measured on rank 0 and shared, so every rank applies the same threshold
        if info.is_main:
            be = breakeven_density(n_pad, hf.n_heads, hf.head_dim, dtype, device, cfg.block_size)
        be = broadcast_object(be, info)
        log(f"kernel break-even density at N={n_pad}, head_dim={hf.head_dim}: {be['breakeven']:.3f} of causal tiles")
    threshold = None if be is None else be["breakeven"]
    sparse = PrefillHandler("sparse", predict, cfg.recall, cfg.block_size, threshold, measure=False, rows=cfg.rows,
                            seed=cfg.seed)
    measure = PrefillHandler("sparse", predict, cfg.recall, cfg.block_size, threshold, measure=True, rows=cfg.rows,
                             seed=cfg.seed)
    dense = {m: PrefillHandler(m) for m in (("flash", "cudnn") if cuda else ("auto",))}
    guard = cuda and cfg.fallback
    # 'unguarded': every layer predicted and run sparse; 'sparse' (as executed): layers whose measured
    # prediction + sparse attention time was not below dense cuDNN on the first window run dense (no prediction)
    modes = [*dense.items(), *([("unguarded", PrefillHandler("sparse", predict, cfg.recall, cfg.block_size,
                                                             threshold, seed=cfg.seed))] if guard else []),
             ("sparse", sparse)]
    per_window = []
    timings: dict[str, dict[str, list[float]]] = {m: {"attention_ms": [], "forward_ms": [], "prediction_ms": [],
                                                      "kernel_ms": []} for m, _ in modes}
    layer_times: dict[str, dict[int, list[float]]] = {m: {} for m, _ in modes}
    dense_layers: list[int] = []
    mine = shard_indices(ids.shape[0], info)
    t_warm = time.perf_counter()
    if cuda:  # compile and autotune every mode once on this rank's first window, outside the timed loop
        for _, h in [("measure", measure), *modes]:
            _forward(hf, h, ids[mine[0]: mine[0] + 1])
    warmup_s = time.perf_counter() - t_warm
    barrier(info)  # every rank starts the timed loop together (a rank's compile is setup, like loading the model)
    t_loop = time.perf_counter()
    for j, w in enumerate(mine):  # j: this rank's window count (the guard is decided on j == 0)
        x = ids[w: w + 1]
        logits, _, _ = _forward(hf, measure, x)
        loss_sparse = _loss(logits, x)
        records = measure.records
        del logits
        losses = {}
        for name, h in modes:
            if name == "sparse" and guard and j == 0:  # decided on window 0 (rank 0), shared with every rank
                lt_s, lt_d = layer_times["unguarded"], layer_times["cudnn"]
                dense_layers = sorted(i for i in lt_s if statistics.median(lt_s[i]) >= statistics.median(lt_d[i]))
                dense_layers = broadcast_object(dense_layers, info)
                sparse.dense_layers = set(dense_layers)
                if dense_layers:
                    log(f"layers run dense (prediction + sparse attention not faster than cuDNN): {dense_layers}")
            for r in range(cfg.reps):
                logits, att, tot = _forward(hf, h, x)
                if r == 0:
                    losses[name] = _loss(logits, x)
                pred_ms = h.prediction_ms()
                timings[name]["attention_ms"].append(att)
                timings[name]["forward_ms"].append(tot)
                timings[name]["prediction_ms"].append(pred_ms)
                timings[name]["kernel_ms"].append(att - pred_ms)
                if cuda:
                    for i, ms in h.layer_ms().items():
                        layer_times[name].setdefault(i, []).append(ms)
                del logits
        ref_name = "cudnn" if cuda else "auto"
        per_window.append({
            "window": w, "loss_dense": losses[ref_name], "loss_dense_by_backend": {k: losses[k] for k in dense},
            "loss_sparse": loss_sparse, "loss_delta": loss_sparse - losses[ref_name],
            "loss_executed": losses["sparse"], "loss_delta_executed": losses["sparse"] - losses[ref_name],
            "layers": [asdict(r) for r in records]})
        log(f"window {w}: loss dense {losses[ref_name]:.4f} sparse {loss_sparse:.4f} as executed {losses['sparse']:.4f}")
    own_s = time.perf_counter() - t_loop  # this rank's windows, before waiting for the others
    if info.enabled:  # every rank gets the merged records and timing samples (window order; ranks in order)
        per_window = gather_ordered(per_window, ids.shape[0], info, to_all=True)
        parts = gather_lists([(timings, layer_times)], info, to_all=True)
        timings = {m: {k: [x for t, _ in parts for x in t[m][k]] for k in d} for m, d in timings.items()}
        layer_times = {m: {i: [x for _, lt in parts for x in lt[m].get(i, [])]
                           for i in sorted({i for _, lt in parts for i in lt[m]})} for m in layer_times}
    res = _summary(cfg, hf, per_window, timings, be, notices, str(device), n_pad)
    res["summary"]["dense_layers"] = dense_layers
    res["world_size"] = info.world_size
    # evaluation wall time (windows + merge; after the gather every rank has waited for the slowest one)
    res["seconds"] = round(time.perf_counter() - t_loop, 3)
    # where the time goes per rank: compile/autotune warm-up (untimed), own windows, and the rest of the timed
    # section (waiting for the slowest rank + gather)
    res["ranks"] = gather_lists([{"rank": info.rank, "windows": len(mine), "warmup_s": round(warmup_s, 3),
                                  "own_windows_s": round(own_s, 3)}], info, to_all=True)
    res["layer_ms"] = {m: {str(i): statistics.median(v) for i, v in d.items()} for m, d in layer_times.items()}
    return res


def _summary(cfg: PrefillConfig, hf: Any, per_window: list[dict], timings: dict, be: Optional[dict],
             notices: list[str], device: str, n_pad: int) -> dict:
    L, H = hf.n_layers, hf.n_heads

    def grid(key: str) -> list[list[float]]:  # layer x head, mean over windows
        acc = [[0.0] * H for _ in range(L)]
        for w in per_window:
            for rec in w["layers"]:
                for h in range(H):
                    acc[rec["layer"]][h] += rec[key][h] / len(per_window)
        return acc

    dens, rec, err = grid("density"), grid("recall"), grid("out_error")
    fb = [[any(bool(w["layers"][li]["dense_fallback"][h]) for w in per_window) for h in range(H)] for li in range(L)]
    # executed density: heads that fell back to dense compute every causal tile
    exe = [[1.0 if fb[li][h] else dens[li][h] for h in range(H)] for li in range(L)]
    deltas = [w["loss_delta"] for w in per_window]
    deltas_exe = [w["loss_delta_executed"] for w in per_window]
    flat = lambda m: [x for row in m for x in row]  # noqa: E731
    ts = {m: {k: _spread(v) for k, v in d.items() if v} for m, d in timings.items()}
    speed = {}
    raw = "unguarded" if "unguarded" in ts else "sparse"
    for base in ("flash", "cudnn", "auto"):
        if base in ts and "sparse" in ts:
            speed[base] = {k: ts[base][k]["median"] / ts["sparse"][k]["median"] for k in ("attention_ms", "forward_ms")}
            # every layer sparse, prediction included / excluded (the pattern given: the kernel's gain, the
            # bound when the pattern is the oracle's)
            speed[base]["unguarded_attention"] = ts[base]["attention_ms"]["median"] / ts[raw]["attention_ms"]["median"]
            speed[base]["unguarded_forward"] = ts[base]["forward_ms"]["median"] / ts[raw]["forward_ms"]["median"]
            speed[base]["kernel_only"] = ts[base]["attention_ms"]["median"] / max(1e-9, ts[raw]["kernel_ms"]["median"])
    worst = min(flat(rec))
    return {
        "config": asdict(cfg), "model": hf.describe(), "device": device, "padded_len": n_pad,
        "notices": notices, "breakeven": be,
        "summary": {
            "recall_target": cfg.recall, "recall_min_head": worst, "recall_mean": statistics.fmean(flat(rec)),
            "recall_met_every_head": worst >= cfg.recall,
            "density_predicted_mean": statistics.fmean(flat(dens)), "density_executed_mean": statistics.fmean(flat(exe)),
            "dense_fallback_heads": sum(flat(fb)), "heads_total": L * H,
            "out_error_max": max(flat(err)), "out_error_mean": statistics.fmean(flat(err)),
            "loss_dense": statistics.fmean(w["loss_dense"] for w in per_window),
            "loss_sparse": statistics.fmean(w["loss_sparse"] for w in per_window),
            "loss_delta": statistics.fmean(deltas), "loss_delta_min": min(deltas), "loss_delta_max": max(deltas),
            "ppl_ratio": math.exp(statistics.fmean(deltas)),
            "loss_delta_executed": statistics.fmean(deltas_exe),
            "loss_delta_executed_range": [min(deltas_exe), max(deltas_exe)],
            "speedup": speed,
        },
        "per_head": {"density": dens, "recall": rec, "out_error": err, "dense_fallback": fb},
        "timings": ts, "windows": per_window,
    }


def format_summary(res: dict) -> str:
    """A few human-readable lines for the CLI."""
    s = res["summary"]
    lines = [f"model {res['model']['name']} N={res['config']['seq_len']} predictor={res['config']['predictor']} "
             f"p={s['recall_target']} device={res['device']}"]
    lines += [f"notice: {n}" for n in res["notices"]]
    lines.append(f"recall per head: min {s['recall_min_head']:.4f}, mean {s['recall_mean']:.4f} "
                 f"({'met' if s['recall_met_every_head'] else 'NOT met'} in every head)")
    lines.append(f"density (causal tiles): predicted {s['density_predicted_mean']:.3f}, executed "
                 f"{s['density_executed_mean']:.3f}; dense fallback {s['dense_fallback_heads']}/{s['heads_total']} heads")
    lines.append(f"output error vs dense: mean {s['out_error_mean']:.2e}, max {s['out_error_max']:.2e}")
    lines.append(f"held-out loss: dense {s['loss_dense']:.4f}, every layer sparse {s['loss_sparse']:.4f} "
                 f"(delta {s['loss_delta']:+.4f}, ppl x{s['ppl_ratio']:.4f})")
    for base, sp in s["speedup"].items():
        lines.append(f"speed-up vs {base}: as executed: attention x{sp['attention_ms']:.2f}, whole forward "
                     f"x{sp['forward_ms']:.2f}; every layer sparse: attention x{sp['unguarded_attention']:.2f} "
                     f"(prediction included), x{sp['kernel_only']:.2f} (kernel alone)")
    if s.get("dense_layers"):
        lines.append(f"layers run dense (prediction + sparse attention measured slower than cuDNN): {s['dense_layers']}; "
                     f"loss delta as executed {s['loss_delta_executed']:+.4f}")
    li = res["per_head"]
    for layer, (d, r) in enumerate(zip(li["density"], li["recall"])):
        lines.append(f"  layer {layer}: density " + " ".join(f"{x:.2f}" for x in d) + " | recall "
                     + " ".join(f"{x:.3f}" for x in r))
    return "\n".join(lines)
