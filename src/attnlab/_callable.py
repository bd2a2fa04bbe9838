"""Make a subpackage callable, so `attnlab.sparsity(...)` runs the pipeline while
`attnlab.sparsity.metrics` stays a module (the API mirrors the CLI: `attnlab sparsity ...`)."""

from __future__ import annotations

import importlib
import sys
import types


def make_callable(package: str, target: str) -> None:
    """Calling module ``package`` calls ``target`` ('module:function'), imported on first call."""
    module_name, func_name = target.split(":")

    class _CallableModule(types.ModuleType):
        def __call__(self, *args, **kwargs):
            return getattr(importlib.import_module(module_name), func_name)(*args, **kwargs)

    sys.modules[package].__class__ = _CallableModule
