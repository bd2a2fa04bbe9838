"""The token-level sparsity predictor registry (Sparsefinder).

A sparsity predictor is registered by name in :data:`PREDICTORS` (tags: ``all`` = in the full set that
``attnlab sparsity run --all`` evaluates (without ``--methods`` or ``--all`` a run evaluates the focused
``DEFAULT_METHODS``), ``learned`` = fits projections and takes ``rank``/``epochs``/``projector``). Token-level predictors give an (N, N) graph through ``predict``.
Adding a predictor is one file plus one registration::

    @PREDICTORS.register("my-method", help="what it does", tags=("all",))
    class MyPredictor(BasePredictor): ...

Block execution of any predictor (``as_block_predictor``) lives in :mod:`attnlab.blocksparse.adapter`;
this package never imports it.
"""

from __future__ import annotations

import importlib
import inspect
import warnings
from typing import Any, Callable

from attnlab.registry import Registry

#: Sparsity predictors by name (classes or factories taking keyword settings).
PREDICTORS: Registry[Callable[..., Any]] = Registry("predictor", "--methods")


def build_predictor(name: str, seed: int = 0, learned: dict | None = None, **kw: Any) -> Any:
    """Instantiate the predictor registered as ``name``: ``learned`` settings (rank, epochs, projector) go to
    predictors tagged ``learned``, ``seed`` to those whose constructor takes one; ``kw`` to all."""
    factory = PREDICTORS.get(name)
    if "learned" in PREDICTORS.entry(name).tags:
        kw = {**(learned or {}), **kw}
    if _takes(factory, "seed"):
        kw["seed"] = seed
    return factory(**kw)


def _takes(factory: Callable[..., Any], name: str) -> bool:
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):  # builtins without a signature
        return False
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


_MOVED = {"TokenGraphBlocks": "attnlab.blocksparse.adapter", "as_block_predictor": "attnlab.blocksparse.adapter"}


def __getattr__(name: str) -> Any:
    """Names that moved to :mod:`attnlab.blocksparse.adapter` (deprecated here)."""
    if name in _MOVED:
        warnings.warn(f"attnlab.sparsity.protocol.{name} moved to {_MOVED[name]}.{name}", DeprecationWarning,
                      stacklevel=2)
        return getattr(importlib.import_module(_MOVED[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
