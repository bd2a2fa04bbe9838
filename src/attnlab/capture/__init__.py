"""Substrate: load models, read corpora, intercept attention.

``attnlab.capture(out, ...)`` saves raw scores (see :func:`attnlab.capture.dump.capture`). Submodules:
``hf`` (HF adapter), ``own`` (our transformer), ``corpus``, ``run`` (streaming driver), ``dump``.
"""

from __future__ import annotations

import importlib
from typing import Any

from .._callable import make_callable

_NAMES = {
    "AttentionCall": "hf", "HFModel": "hf", "StopForward": "hf", "attention_hooks": "hf", "load_model": "hf",
    "own_model_hooks": "own", "iter_documents": "corpus", "stdlib_docstrings": "corpus", "token_windows": "corpus",
    "select_windows": "corpus", "hooks": "run", "stream_attention": "run", "capture_scores": "dump",
}


def __getattr__(name: str) -> Any:
    """Lazy access to the substrate's main names (keeps `import attnlab` free of torch)."""
    if name in _NAMES:
        return getattr(importlib.import_module(f"{__name__}.{_NAMES[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_NAMES)
make_callable(__name__, "attnlab.capture.dump:capture")
