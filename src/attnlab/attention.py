"""The seam between models and everything that looks at or replaces their attention.

A model adapter (``attnlab.sources``) hands each hooked layer's self-attention to a :data:`Handler` as one
:class:`AttentionCall`: q, k, v after rotary embeddings, the model's own mask, the layer index and the
heads. The handler returns a replacement output, or None to let the model run its own attention; it
may raise :class:`StopForward` to end the pass early. Capture, reconstruction, entmax swaps and sparsity
restrictions are all handlers, so they work on every :class:`AttentionSource`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Optional, Protocol, runtime_checkable

import torch

from .errors import ConfigError


@dataclass
class AttentionCall:
    """One self-attention call: tensors as the model computed them (B, H, N, d_head), GQA expanded."""

    layer: int
    query: torch.Tensor  # (B, H, Nq, dh), rotary applied
    key: torch.Tensor  # (B, H, Nk, dh), rotary applied, repeated for grouped-query attention
    value: torch.Tensor  # (B, H, Nk, dh)
    valid: Optional[torch.Tensor]  # bool (B, 1, Nq, Nk): True where the model lets the query see the key
    bias: Optional[torch.Tensor]  # additive finite part, (B, 1 or H, Nq, Nk): mask, ALiBi, T5 position bias; or None
    scaling: float
    softcap: Optional[float] = None
    window: Optional[int] = None  # the sliding window the model passed (key j seen iff 0 <= i - j < window), if any

    def scores(self, heads: Optional[torch.Tensor | slice] = None) -> torch.Tensor:
        """Pre-softmax scores (B, h, Nq, Nk) in float32 for ``heads``; -inf where masked."""
        hs = slice(None) if heads is None else heads
        q, k = self.query[:, hs].float(), self.key[:, hs].float()
        s = (q @ k.transpose(-1, -2)) * self.scaling  # (B, h, Nq, Nk)
        if self.softcap:
            s = torch.tanh(s / self.softcap) * self.softcap
        if self.bias is not None:
            s = s + (self.bias if self.bias.shape[1] == 1 else self.bias[:, hs]).float()
        if self.valid is not None:
            s = s.masked_fill(~self.valid, float("-inf"))
        return s

    @property
    def n_heads(self) -> int:
        """Number of (query) heads."""
        return self.query.shape[1]


# A handler gets the call and returns a replacement output (B, H, Nq, dh), or None to run the model's own.
Handler = Callable[[AttentionCall], Optional[torch.Tensor]]


class StopForward(Exception):
    """Raised by a handler to end the forward pass early (all needed layers seen)."""


@runtime_checkable
class AttentionSource(Protocol):
    """A model whose self-attention calls can be routed through a :data:`Handler` (see ``attnlab.sources``)."""

    name: str
    n_layers: int
    n_heads: int
    max_len: int
    tokenizer: Any  # None when the model has none (callers pass token ids)

    def describe(self) -> dict:
        """JSON-friendly summary of the model."""
        ...

    def hooks(self, handler: Handler, layers: Optional[list[int]] = None) -> ContextManager[None]:
        """Route the chosen layers' attention (all if None) through ``handler`` while open; always undone."""
        ...

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, **kw: Any) -> Any:
        """One forward pass without gradients; a :class:`StopForward` ends it quietly (returns None)."""
        ...


def check_indices(values: Optional[list[int]], n: int, flag: str, what: str) -> list[int]:
    """Validate a list of indices in [0, n) given by ``flag`` (None = all); sorted and deduplicated."""
    if values is None:
        return list(range(n))
    if not values:
        raise ConfigError(f"{flag} is empty; leave it out for all {what}s")
    for v in values:
        if not 0 <= v < n:
            raise ConfigError(f"{flag}: {what} {v} out of range [0, {n})")
    return sorted(set(values))


def check_layers(layers: Optional[list[int]], n_layers: int) -> list[int]:
    """Validate --layers (None = all)."""
    return check_indices(layers, n_layers, "--layers", "layer")


def check_heads(heads: Optional[list[int]], n_heads: int) -> list[int]:
    """Validate --heads (None = all)."""
    return check_indices(heads, n_heads, "--heads", "head")


def stop_quietly(run: Callable[[], Any]) -> Any:
    """``run()`` with :class:`StopForward` treated as a normal early end (returns None then)."""
    try:
        return run()
    except StopForward:
        return None
