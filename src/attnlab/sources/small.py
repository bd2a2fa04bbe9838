"""Attention source for attnlab's own :class:`~attnlab.models.transformer.SmallTransformer`."""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Optional

import torch

from ..attention import Handler, check_layers, stop_quietly
from ..models.transformer import SmallTransformer


class SmallSource:
    """Our small transformer as an attention source (no tokenizer: callers pass token ids)."""

    tokenizer = None

    def __init__(self, model: SmallTransformer, name: str = "SmallTransformer"):
        self.model, self.name = model, name
        self.n_layers, self.n_heads, self.max_len = model.cfg.n_layers, model.cfg.n_heads, model.cfg.max_len

    def describe(self) -> dict:
        """Name and the model config."""
        return {"name": self.name, **self.model.cfg.to_dict()}

    @contextlib.contextmanager
    def hooks(self, handler: Handler, layers: Optional[list[int]] = None) -> Iterator[None]:
        """Route the chosen layers through ``handler`` (a None answer runs the explicit built-in attention);
        the handlers there before are restored on exit, so hooks nest."""
        layers = check_layers(layers, self.n_layers)
        attn = [self.model.blocks[i].attn for i in layers]
        previous = [a.handler for a in attn]
        try:
            for a in attn:
                a.handler = handler
            yield
        finally:
            for a, prev in zip(attn, previous):
                a.handler = prev

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, **kw: Any) -> Any:
        """One forward pass without gradients; :class:`StopForward` ends it quietly."""
        device = next(self.model.parameters()).device
        mask = None if attention_mask is None else attention_mask.to(device)
        with torch.no_grad():
            return stop_quietly(lambda: self.model(input_ids.to(device), mask, **kw))
