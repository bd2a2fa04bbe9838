"""Drive a model over token windows and feed every attention call to handlers (sinks)."""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch

from ..attention import AttentionCall, AttentionSource, StopForward
from ..errors import ConfigError
from ..progress import progress_bar
from ..sources import as_source

Model = AttentionSource | Any  # anything ``attnlab.sources.as_source`` accepts (a name, a SmallTransformer, a source)


def hooks(model: Model, handler, layers: Optional[list[int]] = None):
    """Context manager routing ``layers`` of the model through ``handler``."""
    return as_source(model).hooks(handler, layers)


def n_layers_of(model: Model) -> int:
    """Number of layers."""
    return as_source(model).n_layers


def n_heads_of(model: Model) -> int:
    """Number of heads per layer."""
    return as_source(model).n_heads


def forward(model: Model, ids: torch.Tensor):
    """Forward one batch (no grad); early ``StopForward`` ends it quietly."""
    return as_source(model).forward(ids)


def stream_attention(
    model: Model, windows: torch.Tensor, sink: Callable[[AttentionCall], None], layers: Sequence[int],
    batch_size: int = 8, start_batch: int = 0, on_batch_end: Optional[Callable[[int], None]] = None,
    desc: str = "capture", show_progress: bool = True,
) -> int:
    """Run ``windows`` through the model in batches, calling ``sink`` for each chosen layer's attention.

    The forward pass stops after the deepest chosen layer. ``on_batch_end(batch_index)`` runs after each
    batch (checkpointing); ``start_batch`` skips batches already done. Returns the number of batches.
    """
    src = as_source(model)
    layers = sorted(layers)
    last = layers[-1]

    def handler(call: AttentionCall):
        sink(call)
        if call.layer == last:
            raise StopForward
        return None

    chunks = list(windows.split(batch_size))
    with src.hooks(handler, list(layers)):
        for i in progress_bar(range(start_batch, len(chunks)), desc=desc, enabled=show_progress):
            src.forward(chunks[i])
            if on_batch_end is not None:
                on_batch_end(i)
    return len(chunks)


def resolve_model(model: Model, device: str, seq_len: int) -> AttentionSource:
    """The model's attention source (loaded by name if needed), checking the sequence length fits it."""
    src = as_source(model, device)
    if seq_len > src.max_len and not getattr(src, "fixed_len", None):  # a fixed length (vision) replaces seq_len
        raise ConfigError(f"--seq-len {seq_len} exceeds the model's maximum of {src.max_len} positions")
    return src
