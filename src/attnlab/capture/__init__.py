"""Substrate: load models, read corpora, intercept attention.

``attnlab.capture(out, ...)`` saves raw scores (see :func:`attnlab.capture.dump.capture`). Submodules:
``corpus``, ``run`` (streaming driver), ``dump``; ``hf`` and ``own`` re-export the seam (``attnlab.attention``)
and the model adapters (``attnlab.sources``) from their old places.
"""

from __future__ import annotations

from .._lazy import lazy_package

_NAMES = {
    "AttentionCall": "hf", "HFModel": "hf", "StopForward": "hf", "attention_hooks": "hf", "load_model": "hf",
    "own_model_hooks": "own", "iter_documents": "corpus", "stdlib_docstrings": "corpus", "token_windows": "corpus",
    "select_windows": "corpus", "hooks": "run", "stream_attention": "run", "capture_scores": "dump",
}

lazy_package(__name__, _NAMES, call="attnlab.capture.dump:capture")
