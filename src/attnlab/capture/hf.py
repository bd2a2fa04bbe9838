"""Old home of the HF adapter and the attention seam; kept as re-exports.

New code imports :class:`~attnlab.attention.AttentionCall` and friends from ``attnlab.attention`` and the HF
model source from ``attnlab.sources.hf``.
"""

from __future__ import annotations

from ..attention import AttentionCall, Handler, StopForward, check_heads, check_layers  # noqa: F401
from ..sources.hf import (  # noqa: F401
    DEFAULT_MODEL, IMPL_NAME, HFModel, attention_hooks, attention_modules, load_model, resolve_model_path, run_forward,
)
