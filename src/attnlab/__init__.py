"""attnlab: measure, predict and exploit the structure of self-attention in transformer models.

Python API (mirrors the CLI; each call writes a run directory that ``report`` renders):

    import attnlab
    res = attnlab.spectrum("runs/minilm", model="minilm", n_sequences=64, seq_len=128)
    attnlab.reconstruct("runs/minilm", budget=0.25)       # scores from 25% of the pairs
    attnlab.sparsity("runs/minilm")                       # Sparsefinder on a small entmax model
    attnlab.variables("runs/minilm", task="and", s=3, Ts=[16, 32, 64])
    attnlab.views("runs/minilm", text="The cat sat on the mat.")   # attention heatmaps of your text
    attnlab.report("runs/minilm")
"""

from __future__ import annotations

from typing import Any

from . import logs as _logs  # noqa: F401  (library logging: NullHandler; the CLI adds a console handler)
from .errors import AttnlabError, ConfigError, CorpusError, ModelError, NumericalError, ResultsError, ShapeError

__version__ = "0.1.0"

_LAZY = {
    "capture_scores": ("attnlab.capture.dump", "capture_scores"),
    "load_model": ("attnlab.sources.hf", "load_model"),
    "spectrum": ("attnlab.spectral.run", "spectrum"),
    "compare": ("attnlab.spectral.compare", "compare_runs"),
    "demo": ("attnlab.demo", "run_demo"),
    "views": ("attnlab.report.views", "attention_views"),
}


# Callable subpackages: attnlab.capture(out, ...), attnlab.reconstruct(out, ...), attnlab.sparsity(out, ...),
# attnlab.variables(out, ...), attnlab.report(run_dir); their submodules stay importable as usual.
from . import capture, reconstruct, report, sparsity, variables  # noqa: E402


def __getattr__(name: str) -> Any:
    """Import API functions on first use (keeps `import attnlab` and `attnlab --help` fast)."""
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'attnlab' has no attribute {name!r}")


def __dir__() -> list[str]:
    """Module attributes plus the lazily imported API functions (spectrum, compare, demo, ...)."""
    return sorted(set(globals()) | set(_LAZY))


__all__ = ["capture", "reconstruct", "report", "sparsity", "variables", "AttnlabError", "ConfigError", "CorpusError", "ModelError", "NumericalError", "ResultsError", "ShapeError",
           *_LAZY]
