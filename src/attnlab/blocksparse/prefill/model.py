"""The model side of prefill: load a causal HF LM whose attention can be replaced, route its attention
layers to a handler, take held-out windows, run one timed forward."""

from __future__ import annotations

import contextlib
import time
from typing import Any, Iterator

import torch
from torch import Tensor

from ...errors import ConfigError, ModelError
from .handler import PrefillHandler

__all__ = ["load_causal_model", "prefill_hooks", "heldout_windows", "timed_forward", "window_loss"]


def load_causal_model(name: str, device: torch.device, dtype: torch.dtype) -> Any:
    """Load a causal HF LM and check that its attention routes through AttentionInterface."""
    from ...sources.hf import attention_modules, load_model, resolve_model_path

    from ...sources.families import refuse_for_prefill

    refuse_for_prefill(name, resolve_model_path(name))  # families read by an adapter or not at all: one line
    hf = load_model(name, device=str(device), dtype=dtype, head="causal-lm")
    if not hf.causal:
        raise ConfigError(f"--model {name}: not a causal language model (prefill needs causal self-attention; "
                          "encoders such as BERT attend both ways)")
    attention_modules(hf)  # ModelError when no layer routes through AttentionInterface
    return hf


@contextlib.contextmanager
def prefill_hooks(hf: Any, handler: PrefillHandler) -> Iterator[None]:
    """Route every attention layer to ``handler``. No N x N mask is built: the handler's mask probe checks on
    sampled rows that each mask the model asks for is causal (optionally a sliding window) and returns None;
    the handler applies causality and each layer's window itself."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask, sdpa_mask

    from ...sources.hf import IMPL_NAME, attention_hooks

    with attention_hooks(hf, handler):
        ALL_MASK_ATTENTION_FUNCTIONS.register(IMPL_NAME, getattr(handler, "mask_probe", sdpa_mask))
        try:
            yield
        finally:
            ALL_MASK_ATTENTION_FUNCTIONS.register(IMPL_NAME, eager_mask)


def heldout_windows(hf: Any, seq_len: int, count: int) -> Tensor:
    """``count`` held-out windows (count, seq_len) of token ids: the byte-level model's own held-out split when
    the folder holds attnlab_lm.json, else held-out stdlib documents through the model's tokenizer."""
    from ...lm.data import EOS_ID, OFFSET, load_corpus, windows
    from ...lm.train import read_meta

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


def window_loss(logits: Tensor, ids: Tensor) -> float:
    """Mean next-token cross-entropy of one window (batch row 0)."""
    return float(torch.nn.functional.cross_entropy(logits[0, :-1].float(), ids[0, 1:].to(logits.device)))


def timed_forward(hf: Any, handler: PrefillHandler, ids: Tensor) -> tuple[Tensor, float, float]:
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
