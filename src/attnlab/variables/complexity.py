"""Sample complexity m*(T): the smallest train size whose test accuracy reaches a threshold.

m*(T) is the smallest m such that at least ``share`` of the seeds reach ``threshold`` test accuracy,
found by doubling from ``m_min`` until success, then bisection between the last failure and the
first success until they are within ``rtol`` (relative) or adjacent. Every trial (T, m, seed) is
written to a JSON file as soon as it finishes, so an interrupted sweep resumes without redoing it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Union

from ..errors import ConfigError, ResultsError
from ..io import checkpoint_written, read_json, write_json

# A learner trains on m examples of the length-T task with one seed and returns the test accuracy,
# or a dict holding it under "accuracy" (other keys are stored with the trial).
Learner = Callable[[int, int, int], Union[float, Mapping[str, Any]]]


@dataclass
class SearchConfig:
    """Settings of the doubling-then-bisection search."""

    threshold: float = 0.95  # test accuracy that counts as learned
    share: float = 0.5  # fraction of seeds that must reach it
    m_min: int = 8  # first train size tried
    m_max: int = 65536  # give up (m* = None) beyond this
    rtol: float = 0.1  # stop bisecting when (hi - lo) <= rtol * hi (0 = exact integer search)

    def __post_init__(self) -> None:
        if not 0 < self.threshold <= 1:
            raise ConfigError(f"--threshold must be in (0, 1] (got {self.threshold})")
        if not 0 < self.share <= 1:
            raise ConfigError(f"--share must be in (0, 1] (got {self.share})")
        if self.m_min < 1:
            raise ConfigError(f"--m-min must be >= 1 (got {self.m_min})")
        if self.m_max < self.m_min:
            raise ConfigError(f"--m-max ({self.m_max}) must be >= --m-min ({self.m_min})")
        if not 0 <= self.rtol < 1:
            raise ConfigError(f"--rtol must be in [0, 1) (got {self.rtol})")


def trial_key(T: int, m: int, seed: int) -> str:
    """Key of one trial in the store."""
    return f"T={T}|m={m}|seed={seed}"


class TrialStore:
    """Trials saved atomically to one JSON file after each result; ``fingerprint`` guards resumes."""

    def __init__(self, path: Union[str, Path], fingerprint: Optional[Mapping[str, Any]] = None, resume: bool = True):
        self.path = Path(path)
        self.fingerprint = dict(fingerprint or {})
        self.trials: dict[str, dict[str, Any]] = {}
        if resume and self.path.exists():
            data = read_json(self.path)
            old = data.get("fingerprint", {})
            if self.fingerprint and old != self.fingerprint:
                diff = sorted(k for k in set(old) | set(self.fingerprint) if old.get(k) != self.fingerprint.get(k))
                raise ResultsError(f"{self.path}: cannot resume, settings differ in {diff}; use a new --out or drop --resume")
            self.trials = dict(data.get("trials", {}))

    def get(self, T: int, m: int, seed: int) -> Optional[dict[str, Any]]:
        """The stored record of a trial, or None."""
        return self.trials.get(trial_key(T, m, seed))

    def put(self, T: int, m: int, seed: int, record: Mapping[str, Any]) -> None:
        """Store one trial and rewrite the file atomically."""
        self.trials[trial_key(T, m, seed)] = {"T": T, "m": m, "seed": seed, **record}
        write_json(self.path, {"fingerprint": self.fingerprint, "trials": self.trials})
        checkpoint_written()


@dataclass
class ComplexityResult:
    """m*(T) with every trial the search ran."""

    T: int
    m_star: Optional[int]  # None if not reached by m_max
    lower: int  # largest m that failed (0 if none)
    per_seed: dict[int, Optional[int]]  # smallest tried m at which each seed reached the threshold
    trials: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict."""
        return asdict(self)


def _run_trial(learner: Learner, T: int, m: int, seed: int, store: Optional[TrialStore]) -> dict[str, Any]:
    """Run (or fetch from the store) one trial; return its record with an 'accuracy' key."""
    if store is not None and (rec := store.get(T, m, seed)) is not None:
        return rec
    out = learner(T, m, seed)
    rec = dict(out) if isinstance(out, Mapping) else {"accuracy": float(out)}
    if "accuracy" not in rec:
        raise ConfigError("learner must return an accuracy or a dict with key 'accuracy'")
    rec = {"T": T, "m": m, "seed": seed, **rec}
    if store is not None:
        store.put(T, m, seed, rec)
    return rec


def sample_complexity(
    learner: Learner, T: int, seeds: Iterable[int], cfg: Optional[SearchConfig] = None,
    store: Optional[TrialStore] = None,
) -> ComplexityResult:
    """Find m*(T) for ``learner`` by doubling then bisection (see module docstring)."""
    cfg = cfg or SearchConfig()
    seeds = list(seeds)
    if not seeds:
        raise ConfigError("--seeds must be >= 1")
    need = math.ceil(cfg.share * len(seeds) - 1e-9)
    trials: list[dict[str, Any]] = []

    def succeeds(m: int) -> bool:
        recs = [_run_trial(learner, T, m, s, store) for s in seeds]
        trials.extend(recs)
        return sum(r["accuracy"] >= cfg.threshold for r in recs) >= need

    lo, hi, m = 0, None, cfg.m_min
    while True:  # doubling
        if succeeds(m):
            hi = m
            break
        lo = m
        if m >= cfg.m_max:
            break
        m = min(2 * m, cfg.m_max)
    if hi is not None:
        while hi - lo > max(1.0, cfg.rtol * hi) and lo > 0:  # bisection (lo = 0: m_min itself succeeded)
            mid = (lo + hi) // 2
            if succeeds(mid):
                hi = mid
            else:
                lo = mid
    per_seed: dict[int, Optional[int]] = {}
    for s in seeds:
        ok = [r["m"] for r in trials if r["seed"] == s and r["accuracy"] >= cfg.threshold]
        per_seed[s] = min(ok) if ok else None
    return ComplexityResult(T=T, m_star=hi, lower=lo, per_seed=per_seed, trials=trials)


def sweep(
    learner: Learner, Ts: Iterable[int], seeds: Iterable[int], cfg: Optional[SearchConfig] = None,
    store: Optional[TrialStore] = None, on_result: Optional[Callable[[ComplexityResult], None]] = None,
) -> list[ComplexityResult]:
    """m*(T) for each T in ``Ts`` (ascending order is kept as given); ``on_result`` sees each as it is done."""
    Ts, seeds = list(Ts), list(seeds)
    for T in Ts:
        if T < 1:
            raise ConfigError(f"--T must be >= 1 (got {T})")
    results = []
    for T in Ts:
        res = sample_complexity(learner, T, seeds, cfg, store)
        results.append(res)
        if on_result is not None:
            on_result(res)
    return results
