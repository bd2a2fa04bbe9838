"""The full experiment: sweep m*(T) with real training, fit the laws, probe attention, plot, save.

Results go to the run directory: trials in ``variables_trials.json`` (one write per trial, resumable),
the summary in the ``variables`` section of ``results.json`` (rewritten after every T), plots as PNG.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Union

from ..errors import AttnlabError, ConfigError
from ..io import RunDir
from .complexity import Learner, SearchConfig, TrialStore, sample_complexity
from .tasks import make_task
from .train import TrainConfig, resolve_device, train_model

_log = logging.getLogger(__name__)

SECTION = "variables"
TRIALS_FILE = "variables_trials.json"


@dataclass
class SweepConfig:
    """What to sweep: task, context lengths, seeds, training and search settings."""

    task: str = "and"  # parity | and | or | majority | random
    s: int = 3  # number of relevant bits
    Ts: list[int] = field(default_factory=lambda: [16, 32, 64, 128])  # context lengths
    seeds: int = 3  # seeds 0 .. seeds-1 (offset by seed)
    seed: int = 0  # first seed
    balanced: bool = True  # 50/50 labels
    noise: float = 0.0  # train label-flip probability
    train: TrainConfig = field(default_factory=TrainConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    probe: bool = True  # probe attention at the largest T reached
    budget_s: Optional[float] = None  # start no new T after this many seconds

    def __post_init__(self) -> None:
        if isinstance(self.train, dict):
            self.train = TrainConfig(**self.train)
        if isinstance(self.search, dict):
            self.search = SearchConfig(**self.search)
        if not self.Ts:
            raise ConfigError("--T: give at least one context length")
        for T in self.Ts:
            make_task(self.task, T, self.s, 0, self.balanced, self.noise)  # validates task, s, T, noise
        if self.seeds < 1:
            raise ConfigError(f"--seeds must be >= 1 (got {self.seeds})")
        self.Ts = sorted(set(int(t) for t in self.Ts))

    def seed_list(self) -> list[int]:
        """The seeds used."""
        return list(range(self.seed, self.seed + self.seeds))

    def fingerprint(self) -> dict[str, Any]:
        """Settings a trial's outcome depends on (a resume must match them)."""
        return {"task": self.task, "s": self.s, "balanced": self.balanced, "noise": self.noise,
                "train": self.train.to_dict()}


def make_learner(cfg: SweepConfig, device: str = "cpu") -> Learner:
    """A learner (T, m, seed) -> record with the test accuracy, training real models."""

    def learn(T: int, m: int, seed: int) -> dict[str, Any]:
        task = make_task(cfg.task, T, cfg.s, seed, cfg.balanced, cfg.noise)
        r = train_model(task, m, cfg.train, device=device, seed=seed)
        return {"accuracy": r.test_acc, "train_acc": r.train_acc, "val_acc": r.val_acc, "steps": r.steps,
                "best_step": r.best_step, "seconds": round(r.seconds, 3), "qk_max": r.norms["qk_max"],
                "v": r.norms["v"], "out": r.norms["out"]}

    return learn


def run_sweep(
    cfg: SweepConfig, out: Union[str, Path, RunDir], device: str = "cpu", resume: bool = False,
    learner: Optional[Learner] = None, log: Optional[Callable[[str], None]] = None, plots: bool = True,
) -> dict[str, Any]:
    """Run the sweep, fit, probe and plot; write the ``variables`` section and return it."""
    log = log or _log.info
    run = out if isinstance(out, RunDir) else RunDir(out)
    dev = str(resolve_device(device))
    learner = learner or make_learner(cfg, dev)
    cfg_dict = asdict(cfg)
    run.write_config(SECTION, {**cfg_dict, "device": dev})
    store = TrialStore(run.file(TRIALS_FILE), cfg.fingerprint(), resume=resume)
    t0 = time.perf_counter()
    section: dict[str, Any] = {"config": cfg_dict, "device": dev, "results": [], "skipped_T": []}
    for T in cfg.Ts:
        if cfg.budget_s is not None and time.perf_counter() - t0 > cfg.budget_s:
            section["skipped_T"].append(T)
            continue
        t1 = time.perf_counter()
        res = sample_complexity(learner, T, cfg.seed_list(), cfg.search, store)
        d = res.to_dict()
        d["n_trials"] = len(d.pop("trials"))
        d["seconds"] = round(time.perf_counter() - t1, 2)
        section["results"].append(d)
        section["wall_s"] = round(time.perf_counter() - t0, 2)
        run.write_section(SECTION, section)
        log(f"T={T:5d}  m*={res.m_star}  (lower {res.lower})  per-seed={res.per_seed}  {d['seconds']:.1f}s")
    _analyse(cfg, run, section, dev, log, plots)
    section["wall_s"] = round(time.perf_counter() - t0, 2)
    run.write_section(SECTION, section)
    return section


def _analyse(cfg: SweepConfig, run: RunDir, section: dict[str, Any], device: str,
             log: Callable[[str], None], plots: bool) -> None:
    """Fit the laws, probe attention and draw the plots into ``section``."""
    from .fit import fit_laws

    done = [r for r in section["results"] if r["m_star"] is not None]
    try:
        fits = fit_laws([r["T"] for r in done], [r["m_star"] for r in done])
        section["fits"] = fits.to_dict()
        log(f"fits: log SSE={fits.log.sse:.4g} AICc={fits.log.aic:.2f}; power SSE={fits.power.sse:.4g} "
            f"AICc={fits.power.aic:.2f} (c={fits.power.params['c']:.3f}); best: {fits.best}")
    except AttnlabError as e:
        section["fits"], section["fit_error"] = None, str(e)
        log(f"fits skipped: {e}")
    section["plots"] = []
    if cfg.probe and done:
        from .probe import attention_probe

        top = done[-1]
        task = make_task(cfg.task, top["T"], cfg.s, cfg.seed, cfg.balanced, cfg.noise)
        r = train_model(task, top["m_star"], cfg.train, device=device, seed=cfg.seed)
        section["probe"] = {"T": top["T"], "m": top["m_star"], "seed": cfg.seed, "test_acc": r.test_acc,
                            **attention_probe(r.model, task)}
        log(f"probe at T={top['T']}, m={top['m_star']}: mass on relevant per layer/head {section['probe']['mass']}")
    if plots:
        from .plots import COMPLEXITY_PNG, PROBE_PNG, plot_complexity, plot_probe

        if done:
            plot_complexity(section["results"], section.get("fits"), run.file(COMPLEXITY_PNG))
            section["plots"].append(COMPLEXITY_PNG)
        if section.get("probe"):
            plot_probe(section["probe"], run.file(PROBE_PNG))
            section["plots"].append(PROBE_PNG)


def run_variables(out: Union[str, Path], device: str = "cpu", resume: bool = False, progress: bool = True,
                  **settings: Any) -> dict[str, Any]:
    """Python mirror of `attnlab variables sweep`: ``settings`` are :class:`SweepConfig` fields
    (``train=`` / ``search=`` may be dicts of :class:`TrainConfig` / :class:`SearchConfig` fields)."""
    cfg = SweepConfig(**settings)
    return run_sweep(cfg, out, device=device, resume=resume, log=_log.info if progress else _log.debug)
