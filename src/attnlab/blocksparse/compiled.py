"""The one cache of ``torch.compile``d functions of block-sparse execution (FlexAttention, block prediction,
exact block mass), each compiled once per process and switched off for the process on its first failure."""

from __future__ import annotations

import warnings
from typing import Any, Callable

import torch

__all__ = ["compiled", "call_compiled", "compile_enabled", "set_compile_enabled"]

_CACHE: dict[str, Callable[..., Any]] = {}
_OFF: set[str] = set()


def compiled(name: str, fn: Callable[..., Any], **options: Any) -> Callable[..., Any]:
    """``torch.compile(fn, **options)`` cached under ``name`` (created on first use)."""
    if name not in _CACHE:
        _CACHE[name] = torch.compile(fn, **options)
    return _CACHE[name]


def compile_enabled(name: str) -> bool:
    """False once compiling ``name`` failed in this process (or it was switched off)."""
    return name not in _OFF


def set_compile_enabled(name: str, on: bool) -> None:
    """Switch the compiled path of ``name`` on or off for this process."""
    (_OFF.discard if on else _OFF.add)(name)


def call_compiled(name: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args)`` through its compiled version; if compiling or running it fails, warn once, switch the
    compiled path of ``name`` off and run ``fn`` eagerly (the results are the same computation)."""
    if compile_enabled(name):
        try:
            return compiled(name, fn, dynamic=False)(*args, **kwargs)
        except Exception as e:  # pragma: no cover - depends on the torch build
            warnings.warn(f"compiled {name} failed ({type(e).__name__}: {e}); using eager")
            set_compile_enabled(name, False)
    return fn(*args, **kwargs)
