"""Substrate: load models, read corpora, intercept attention."""

from .corpus import iter_documents, stdlib_docstrings, token_windows
from .hf import AttentionCall, HFModel, StopForward, attention_hooks, load_model
from .own import own_model_hooks
from .run import hooks, stream_attention

__all__ = [
    "AttentionCall", "HFModel", "StopForward", "attention_hooks", "hooks", "iter_documents", "load_model",
    "own_model_hooks", "stdlib_docstrings", "stream_attention", "token_windows",
]
