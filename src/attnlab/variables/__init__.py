"""Variable creation: sparse Boolean tasks, bounded-norm training, sample complexity m*(T), law fits.

Names are imported lazily (PEP 562) so that ``attnlab variables --help`` does not import torch;
``attnlab.variables(out, task="and", s=3, Ts=[16, 32, 64], ...)`` runs a sweep (see :func:`run_variables`).
"""

from __future__ import annotations

from .._lazy import lazy_package

_EXPORTS = {
    "ComplexityResult": "complexity", "Learner": "complexity", "SearchConfig": "complexity",
    "TrialStore": "complexity", "sample_complexity": "complexity", "sweep": "complexity",
    "SweepConfig": "config", "SweepOptions": "config", "TrainOptions": "config",
    "make_learner": "experiment", "run_sweep": "experiment",
    "run_variables": "experiment",
    "FitReport": "fit", "LawFit": "fit", "fit_laws": "fit",
    "attention_probe": "probe", "mass_at_mstar": "probe", "mass_cap": "probe", "relevant_mass": "probe",
    "run_probe_bounds": "bound_probe",
    "plot_complexity": "plots", "plot_probe": "plots",
    "render_section": "report",
    "TASKS": "tasks", "Split": "tasks", "SparseBooleanTask": "tasks", "make_task": "tasks",
    "NormControl": "train", "TrainConfig": "train", "TrainResult": "train", "model_norms": "train",
    "project_norms": "train", "train_model": "train",
}

lazy_package(__name__, _EXPORTS, call="attnlab.variables.experiment:run_variables")
