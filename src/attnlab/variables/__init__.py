"""Variable creation: sparse Boolean tasks, bounded-norm training, sample complexity m*(T), law fits."""

from .complexity import ComplexityResult, Learner, SearchConfig, TrialStore, sample_complexity, sweep
from .experiment import SweepConfig, make_learner, run_sweep
from .fit import FitReport, LawFit, fit_laws
from .probe import attention_probe
from .tasks import TASKS, Split, SparseBooleanTask, make_task
from .train import NormControl, TrainConfig, TrainResult, model_norms, project_norms, train_model

__all__ = [
    "TASKS", "ComplexityResult", "FitReport", "LawFit", "Learner", "NormControl", "SearchConfig", "Split",
    "SparseBooleanTask", "SweepConfig", "TrainConfig", "TrainResult", "TrialStore", "attention_probe", "fit_laws",
    "make_learner", "make_task", "model_norms", "project_norms", "run_sweep", "sample_complexity", "sweep",
    "train_model",
]
