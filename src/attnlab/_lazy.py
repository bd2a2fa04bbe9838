"""Lazy, callable subpackages.

``attnlab.sparsity(...)`` runs the pipeline while ``attnlab.sparsity.metrics`` stays a module (the API
mirrors the CLI: ``attnlab sparsity ...``), and public names are imported from their submodules on first
use, so that ``import attnlab`` and ``attnlab --help`` do not import torch.
"""

from __future__ import annotations

import importlib
import inspect
import sys
import types
from typing import Any, Mapping, Optional


def lazy_package(package: str, exports: Mapping[str, str], call: Optional[str] = None) -> None:
    """Make module ``package`` resolve ``exports`` (name -> submodule) lazily and, with ``call``
    ('module:function'), callable."""
    module_name, func_name = call.split(":") if call else (None, None)

    class _LazyPackage(types.ModuleType):
        def __getattr__(self, name: str) -> Any:
            if name not in exports:
                raise AttributeError(f"module {package!r} has no attribute {name!r}")
            return getattr(importlib.import_module(f"{package}.{exports[name]}"), name)

        def __dir__(self) -> list[str]:
            return sorted(set(super().__dir__()) | set(exports))

        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            if module_name is None:
                raise TypeError(f"module {package!r} is not callable")
            return _target()(*args, **kwargs)

        # help(), inspect.signature() and IDEs see the function that a call runs (imported on first look).
        @property
        def __signature__(self) -> inspect.Signature:
            if module_name is None:
                raise AttributeError("__signature__")
            return inspect.signature(_target())

        @property
        def __doc__(self) -> Optional[str]:  # type: ignore[override]
            if module_name is None:
                return module_doc
            fn = _target()
            return (f"{package}{inspect.signature(fn)}\n\n{inspect.getdoc(fn) or ''}\n\n"
                    f"(calls {module_name}.{func_name}; the package itself:)\n\n{module_doc or ''}")

        @__doc__.setter
        def __doc__(self, value: Optional[str]) -> None:
            pass

    def _target() -> Any:
        return getattr(importlib.import_module(module_name), func_name)

    module = sys.modules[package]
    module_doc = module.__dict__.get("__doc__")
    module.__class__ = _LazyPackage
    module.__all__ = sorted(exports)


def moved_module(old: str, new: str) -> None:
    """Make the deprecated module path ``old`` an alias of module ``new`` (same object: patches reach both)."""
    import warnings

    warnings.warn(f"{old} moved to {new}; import it from there", DeprecationWarning, stacklevel=3)
    sys.modules[old] = importlib.import_module(new)
