"""Variable creation: sparse Boolean tasks, bounded-norm training, sample complexity m*(T), law fits.

Names are imported lazily (PEP 562) so that ``attnlab variables --help`` does not import torch;
``attnlab.variables(out, task="and", s=3, Ts=[16, 32, 64], ...)`` runs a sweep (see :func:`run_variables`).
"""

from __future__ import annotations

import importlib
from typing import Any

from .._callable import make_callable

_EXPORTS = {
    "ComplexityResult": "complexity", "Learner": "complexity", "SearchConfig": "complexity",
    "TrialStore": "complexity", "sample_complexity": "complexity", "sweep": "complexity",
    "SweepConfig": "experiment", "make_learner": "experiment", "run_sweep": "experiment",
    "run_variables": "experiment",
    "FitReport": "fit", "LawFit": "fit", "fit_laws": "fit",
    "attention_probe": "probe",
    "plot_complexity": "plots", "plot_probe": "plots",
    "render_section": "report",
    "TASKS": "tasks", "Split": "tasks", "SparseBooleanTask": "tasks", "make_task": "tasks",
    "NormControl": "train", "TrainConfig": "train", "TrainResult": "train", "model_norms": "train",
    "project_norms": "train", "train_model": "train",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    """Import the public name from its submodule on first use."""
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)


def __dir__() -> list[str]:
    return __all__


make_callable(__name__, "attnlab.variables.experiment:run_variables")
