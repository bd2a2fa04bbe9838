"""Adapter for attnlab's own :class:`SmallTransformer`: the same :class:`AttentionCall` handlers as for HF models."""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional


from ..models.attention import dense_attention
from ..models.transformer import SmallTransformer
from .hf import AttentionCall, Handler, check_layers


@contextlib.contextmanager
def own_model_hooks(model: SmallTransformer, handler: Handler, layers: Optional[list[int]] = None) -> Iterator[None]:
    """Route the chosen layers of our transformer through ``handler`` (output kept unless it returns one)."""
    layers = check_layers(layers, model.cfg.n_layers)
    previous = {i: model.overrides.get(i) for i in layers}

    def override(q, k, v, allowed, layer):
        call = AttentionCall(layer, q, k, v, allowed, None, q.shape[-1] ** -0.5)
        out = handler(call)
        if out is not None:
            return out, None
        block = model.blocks[layer].attn
        return dense_attention(q, k, v, allowed, model.cfg.attention, block.alpha())

    try:
        model.set_override(override, layers)
        yield
    finally:
        for i, prev in previous.items():
            model.set_override(prev, [i])
