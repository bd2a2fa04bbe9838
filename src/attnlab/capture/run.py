"""Drive a model over token windows and feed every attention call to handlers (sinks)."""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from ..errors import ConfigError
from ..models.transformer import SmallTransformer
from ..progress import progress_bar
from .hf import AttentionCall, HFModel, StopForward, attention_hooks, load_model, run_forward
from .own import own_model_hooks

Model = HFModel | SmallTransformer


def hooks(model: Model, handler, layers: Optional[list[int]] = None):
    """Context manager routing ``layers`` of either model kind through ``handler``."""
    if isinstance(model, SmallTransformer):
        return own_model_hooks(model, handler, layers)
    return attention_hooks(model, handler, layers)


def n_layers_of(model: Model) -> int:
    """Number of layers."""
    return model.cfg.n_layers if isinstance(model, SmallTransformer) else model.n_layers


def n_heads_of(model: Model) -> int:
    """Number of heads per layer."""
    return model.cfg.n_heads if isinstance(model, SmallTransformer) else model.n_heads


def forward(model: Model, ids: torch.Tensor):
    """Forward one batch (no grad); early ``StopForward`` ends it quietly."""
    if isinstance(model, SmallTransformer):
        device = next(model.parameters()).device
        try:
            with torch.no_grad():
                return model(ids.to(device))
        except StopForward:
            return None
    return run_forward(model, ids)


def stream_attention(
    model: Model, windows: torch.Tensor, sink: Callable[[AttentionCall], None], layers: Sequence[int],
    batch_size: int = 8, start_batch: int = 0, on_batch_end: Optional[Callable[[int], None]] = None,
    desc: str = "capture", show_progress: bool = True,
) -> int:
    """Run ``windows`` through the model in batches, calling ``sink`` for each chosen layer's attention.

    The forward pass stops after the deepest chosen layer. ``on_batch_end(batch_index)`` runs after each
    batch (checkpointing); ``start_batch`` skips batches already done. Returns the number of batches.
    """
    layers = sorted(layers)
    last = layers[-1]

    def handler(call: AttentionCall):
        sink(call)
        if call.layer == last:
            raise StopForward
        return None

    chunks = list(windows.split(batch_size))
    with hooks(model, handler, list(layers)):
        for i in progress_bar(range(start_batch, len(chunks)), desc=desc, enabled=show_progress):
            forward(model, chunks[i])
            if on_batch_end is not None:
                on_batch_end(i)
    return len(chunks)


def resolve_model(model: str | Model, device: str, seq_len: int) -> Model:
    """Load by name if needed and check the sequence length fits the model."""
    m = load_model(model, device=device) if isinstance(model, str) else model
    max_len = m.cfg.max_len if isinstance(m, SmallTransformer) else m.max_len
    if seq_len > max_len:
        raise ConfigError(f"--seq-len {seq_len} exceeds the model's maximum of {max_len} positions")
    return m
