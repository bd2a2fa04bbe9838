"""Attention sources: the only place that knows what kind of model it holds.

An :class:`~attnlab.attention.AttentionSource` has layers, heads, a maximum length, a description, hooks
that route chosen layers through a handler, and a forward pass. ``hf`` covers every transformers model
that routes attention through ``AttentionInterface`` (``loading`` loads it, ``families`` is the registry of
families and their status, ``images`` feeds vision encoders); ``small`` covers our :class:`SmallTransformer`. A
model family that needs its own interception is one adapter file here (``falcon`` is the worked example) plus
its ``route`` in ``families``.
"""

from __future__ import annotations

from typing import Any

from ..attention import AttentionSource


def as_source(model: Any, device: str = "cpu") -> AttentionSource:
    """An attention source for ``model``: a name/folder (loaded as an HF model), our SmallTransformer, or a source."""
    if isinstance(model, str):
        from .hf import load_model

        return load_model(model, device=device)
    from ..models.transformer import SmallTransformer

    if isinstance(model, SmallTransformer):
        from .small import SmallSource

        return SmallSource(model)
    if isinstance(model, AttentionSource):
        return model
    from ..errors import ConfigError

    raise ConfigError(f"cannot read attention from a {type(model).__name__}: give a model name or folder, a "
                      "SmallTransformer, or an attnlab.sources adapter")
