"""Sliding windows in prefill: each layer's window from the config, the mask the model asks for (checked to be
causal, optionally windowed, then not built), windowed exact scores and the windowed oracle.

Three sources must agree for a layer to run: the config (``sliding_window`` with ``layer_types``, Qwen2's
``use_sliding_window``/``max_window_layers`` already folded into ``layer_types`` by transformers, Gemma-3's
``sliding_window_pattern``), the ``sliding_window`` the attention module passes to its attention function
(what FlashAttention reads; :attr:`attnlab.attention.AttentionCall.window`), and the mask functions the
model hands to the mask interface at the prefill length (sampled rows must be a causal band)."""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import Tensor

from ...errors import ModelError

__all__ = ["layer_windows", "effective_window", "MaskProbe", "windowed_row_scores", "windowed_block_mass",
           "windowed_oracle"]


def layer_windows(config: Any, n_layers: int) -> list[Optional[int]]:
    """The sliding window of each of ``n_layers`` decoder layers from a transformers config (None: full
    causal attention)."""
    tc = config.get_text_config() if hasattr(config, "get_text_config") else config
    w = getattr(tc, "sliding_window", None)
    if not w or (getattr(tc, "use_sliding_window", True) is False):
        return [None] * n_layers
    types = getattr(tc, "layer_types", None)
    if types:
        if len(types) != n_layers:
            raise ModelError(f"config.layer_types has {len(types)} entries for {n_layers} attention layers")
        return [int(w) if t == "sliding_attention" else None for t in types]
    pattern = getattr(tc, "sliding_window_pattern", None) or getattr(tc, "_sliding_window_pattern", None)
    if pattern:
        return [int(w) if (i + 1) % int(pattern) else None for i in range(n_layers)]
    return [int(w)] * n_layers


def effective_window(window: Optional[int], n: int) -> Optional[int]:
    """``window`` if it hides some key at length ``n`` (window < n), else None (plain causal)."""
    return int(window) if window is not None and int(window) < n else None


def _row_window(allowed: Tensor, qi: int, kv: Tensor) -> Optional[int]:
    """The window (key count) if ``allowed`` (M,) is exactly keys (qi - c, qi], else None."""
    c = int(allowed.sum())
    want = (kv <= qi) & (kv > qi - c)
    return c if c > 0 and bool(torch.equal(allowed, want)) else None


class MaskProbe:
    """A mask function for ``ALL_MASK_ATTENTION_FUNCTIONS`` during prefill: when the model's ``mask_function``
    is, on sampled rows, causal (optionally a sliding window), it records the window and returns None (the
    handler applies causality and windows itself: no N x N mask); any other mask is built as SDPA would (so a
    layer that uses it reaches the handler with a mask and is refused). Padding is refused."""

    def __init__(self) -> None:
        self.windows: set[Optional[int]] = set()

    def __call__(self, batch_size: int = 1, q_length: int = 0, kv_length: int = 0, q_offset: int = 0,
                 kv_offset: int = 0, mask_function: Optional[Callable] = None, attention_mask: Any = None,
                 **kw: Any) -> Any:
        if attention_mask is not None and not bool(torch.as_tensor(attention_mask).bool().all()):
            raise ModelError("prefill runs unpadded windows of text: this forward passed a padding mask")
        if mask_function is None or not q_length:
            return None
        w = self.band_window(mask_function, int(q_length), int(kv_length or q_length), int(q_offset),
                             int(kv_offset))
        if w is False:  # not a causal band (e.g. a bidirectional mask built but maybe unused): the real mask, so
            from transformers.masking_utils import sdpa_mask  # a layer that uses it is refused by the handler

            kw.update(allow_is_causal_skip=False, allow_is_bidirectional_skip=False)  # never None: not causal
            return sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                             kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask, **kw)
        self.windows.add(w)
        return None

    @staticmethod
    def band_window(mask_function: Callable, q_length: int, kv_length: int, q_offset: int = 0,
                    kv_offset: int = 0) -> Any:
        """On sampled rows: the window of a causal sliding-window ``mask_function`` (None: plain causal), or
        False when it is not a causal band."""
        rows = sorted({0, 1, q_length // 2, q_length - 1} & set(range(q_length)))
        qi = torch.tensor(rows).view(-1, 1) + q_offset
        kv = torch.arange(kv_length).view(1, -1) + kv_offset
        try:
            zero = torch.zeros((), dtype=torch.long)
            allowed = torch.as_tensor(mask_function(zero, zero, qi, kv)).bool().expand(len(rows), kv_length)
        except Exception:  # not index-based: cannot be read here
            return False
        counts = []
        for r, q in enumerate(qi.flatten().tolist()):
            c = _row_window(allowed[r], q, kv.flatten())
            if c is None:
                return False
            counts.append((q, c))
        narrow = {c for q, c in counts if c < q + 1}  # rows whose window hides earlier keys
        w = next(iter(narrow), None)
        if len(narrow) > 1 or (w is not None and any(c == q + 1 and c > w for q, c in counts)):
            return False
        return w


def windowed_row_scores(q: Tensor, k: Tensor, rows: Tensor, scale: float, dtype: torch.dtype,
                        window: Optional[int] = None, softcap: Optional[float] = None) -> Tensor:
    """Exact scores (B, H, R, M) of query ``rows`` as the model computes them: softcap (if any), then causal
    and sliding-window keys kept (others -inf)."""
    s = torch.matmul(q[:, :, rows].to(dtype), k.to(dtype).transpose(-1, -2)) * scale
    if softcap:
        s = torch.tanh(s / softcap) * softcap
    d = rows.view(1, 1, -1, 1).to(q.device) - torch.arange(k.shape[2], device=q.device).view(1, 1, 1, -1)
    hide = d < 0 if window is None else (d < 0) | (d >= window)
    return s.masked_fill(hide, float("-inf"))


@torch.no_grad()
def windowed_block_mass(q: Tensor, k: Tensor, block_size: int, scale: float, window: Optional[int] = None,
                        softcap: Optional[float] = None, row_chunk: int = 1024) -> Tensor:
    """Exact tile mass (B, H, nq, nk) under the model's windowed (softcapped) causal attention: per query block
    the mean over its rows of each key block's softmax mass. Costs one q.k^T (the oracle's price)."""
    from ..recall import expand_kv_heads

    k = expand_kv_heads(k, q.shape[1])
    B, H, N, _ = q.shape
    nk = k.shape[2] // block_size
    dt = torch.float64 if q.dtype == torch.float64 else torch.float32
    row_chunk = max(block_size, row_chunk // block_size * block_size)
    out = torch.empty(B, H, N // block_size, nk, dtype=dt, device=q.device)
    for r0 in range(0, N, row_chunk):
        rows = torch.arange(r0, min(N, r0 + row_chunk), device=q.device)
        p = torch.softmax(windowed_row_scores(q, k, rows, scale, dt, window, softcap), dim=-1)
        bm = p.view(B, H, rows.numel(), nk, block_size).sum(-1)
        out[:, :, r0 // block_size: (r0 + rows.numel()) // block_size] = bm.view(B, H, -1, block_size, nk).mean(3)
    return out


def windowed_oracle(method: Any, q: Tensor, k: Tensor, p: float, block_size: int, scale: float,
                    window: Optional[int], softcap: Optional[float]) -> tuple[Any, float]:
    """The oracle's pattern (fewest tiles reaching ``p`` of the exact mass, per query block or per head as the
    method's ``scope``) on the windowed, softcapped attention the model computes: (pattern, multiply-adds)."""
    from ..blockmask import window_pattern
    from ..predictors.core import graph_pattern, keep_graph, mass_thresholds

    mass = windowed_block_mass(q, k, block_size, scale, window, softcap)
    graph = keep_graph(mass_thresholds(mass, True, 0, getattr(method, "scope", "row")), p)
    B, H, N, D = q.shape
    return window_pattern(graph_pattern(graph, block_size, True), window), float(B * H * N * N * D) * 0.5
