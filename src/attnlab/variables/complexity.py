"""Sample complexity m*(T): the smallest train size whose test accuracy reaches a threshold.

Per seed, m*_s is the smallest tried m from which every larger tried m reaches ``threshold`` test
accuracy *among the trials that fit their training set* (the learner's record says ``fit``: train accuracy
on all m examples at least the fit criterion; a trial that does not fit is an optimisation failure, which
says nothing about generalisation, so it neither succeeds nor fails and its m is not tried again; the fit rate
per m is reported beside m*). It is found in rounds: doubling blocks (``m_min``, 2 m_min, ... ``doubling`` sizes at a time, up
to ``m_max``) until a seed succeeds, then ``points`` geometrically spaced sizes inside each seed's bracket
(last failure, first success) per round until ``hi - lo <= rtol * hi`` (or the bracket is two adjacent
integers). All seeds' trials of a round go to the learner at once, so a vectorised learner trains them
in one ensemble. m*(T) is the median over seeds with a bootstrap confidence interval; a seed that never
reaches the threshold by ``m_max`` counts as infinite (so m*(T) is "not learned up to m_max" when half
the seeds fail). Every trial (T, m, seed) is written to a JSON file as soon as its round (or, for a
one-trial learner, the trial) finishes, so an interrupted sweep resumes without redoing it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Union

import numpy as np

from ..errors import ConfigError, ResultsError
from ..io import checkpoint_written, read_json, write_json

# A learner trains on m examples of the length-T task with one seed and returns the test accuracy,
# or a dict holding it under "accuracy" (other keys are stored with the trial). A learner with the
# attribute ``batched = True`` takes (T, [(m, seed), ...]) and returns one such result per pair.
Learner = Callable[..., Any]


@dataclass
class SearchConfig:
    """Settings of the per-seed doubling-then-refinement search."""

    threshold: float = 0.95  # test accuracy that counts as learned
    m_min: int = 8  # first train size tried
    m_max: int = 65536  # give up (m*_s = not learned) beyond this
    rtol: float = 0.05  # stop refining when (hi - lo) <= rtol * hi (0 = exact integer search)
    points: int = 4  # sizes tried inside each seed's bracket per refinement round
    doubling: int = 8  # sizes per doubling round
    disagree: float = 4.0  # flag a T whose per-seed m* differ by more than this factor (max / min)
    n_boot: int = 2000  # bootstrap resamples for the CI of the median
    level: float = 0.95  # confidence level

    def __post_init__(self) -> None:
        if not 0 < self.threshold <= 1:
            raise ConfigError(f"--threshold must be in (0, 1] (got {self.threshold})")
        if self.m_min < 1:
            raise ConfigError(f"--m-min must be >= 1 (got {self.m_min})")
        if self.m_max < self.m_min:
            raise ConfigError(f"--m-max ({self.m_max}) must be >= --m-min ({self.m_min})")
        if not 0 <= self.rtol < 1:
            raise ConfigError(f"--rtol must be in [0, 1) (got {self.rtol})")
        if self.points < 1:
            raise ConfigError(f"--points must be >= 1 (got {self.points})")
        if self.doubling < 1:
            raise ConfigError(f"--doubling must be >= 1 (got {self.doubling})")
        if not self.disagree > 1:
            raise ConfigError(f"--disagree must be > 1 (got {self.disagree})")
        if not 0 < self.level < 1:
            raise ConfigError(f"--level must be in (0, 1) (got {self.level})")


def trial_key(T: int, m: int, seed: int) -> str:
    """Key of one trial in the store."""
    return f"T={T}|m={m}|seed={seed}"


class TrialStore:
    """Trials saved atomically to one JSON file after each result; ``fingerprint`` guards resumes. ``write=False``
    keeps them in memory only (torchrun ranks other than 0: rank 0 saves the merged trials). ``save_to``: write
    there instead of ``path`` (a torchrun rank's own file while ranks search different T's); a resume reads
    ``path`` and every rank file ``<stem>.rank*.json`` next to it."""

    def __init__(self, path: Union[str, Path], fingerprint: Optional[Mapping[str, Any]] = None, resume: bool = True,
                 write: bool = True, save_to: Optional[Union[str, Path]] = None):
        self.path, self.write = Path(path), write
        self.save_to = Path(save_to) if save_to is not None else self.path
        self.fingerprint = dict(fingerprint or {})
        self.trials: dict[str, dict[str, Any]] = {}
        if resume:
            for f in [self.path, *self.rank_files()]:
                if f.exists():
                    self._load(f)

    def rank_files(self) -> list[Path]:
        """Per-rank trial files left next to ``path`` by a T-sharded torchrun run (merged and removed at its end)."""
        return sorted(self.path.parent.glob(f"{self.path.stem}.rank*.json"))

    @staticmethod
    def rank_file(path: Union[str, Path], rank: int) -> Path:
        """Where rank ``rank`` saves its trials (next to ``path``) while ranks search different T's."""
        path = Path(path)
        return path.with_name(f"{path.stem}.rank{rank}.json")

    def _load(self, f: Path) -> None:
        data = read_json(f)
        old = data.get("fingerprint", {})
        if self.fingerprint and old != self.fingerprint:
            diff = sorted(k for k in set(old) | set(self.fingerprint) if old.get(k) != self.fingerprint.get(k))
            raise ResultsError(f"{f}: cannot resume, settings differ in {diff}; use a new --out or drop --resume")
        self.trials.update(data.get("trials", {}))

    def get(self, T: int, m: int, seed: int) -> Optional[dict[str, Any]]:
        """The stored record of a trial, or None."""
        return self.trials.get(trial_key(T, m, seed))

    def put(self, T: int, m: int, seed: int, record: Mapping[str, Any]) -> None:
        """Store one trial and rewrite the file atomically."""
        self.put_many([{**record, "T": T, "m": m, "seed": seed}])

    def put_many(self, records: Sequence[Mapping[str, Any]]) -> None:
        """Store several trials (each with T, m, seed keys) in one atomic rewrite."""
        for r in records:
            self.trials[trial_key(r["T"], r["m"], r["seed"])] = dict(r)
        if self.write:
            write_json(self.save_to, {"fingerprint": self.fingerprint, "trials": self.trials})
            checkpoint_written()


def median_ci(values: Sequence[Optional[float]], n_boot: int = 2000, level: float = 0.95, seed: int = 0
              ) -> tuple[Optional[float], list[Optional[float]]]:
    """Median of ``values`` (None = infinite) and its percentile-bootstrap CI; infinite ends come back as None."""
    v = np.array([math.inf if x is None else float(x) for x in values])
    if v.size == 0:
        raise ConfigError("median_ci needs at least one value")
    as_opt = lambda x: None if not math.isfinite(x) else float(x)  # noqa: E731
    med = _median(v)
    rng = np.random.default_rng(seed)
    boots = np.array([_median(v[rng.integers(0, len(v), len(v))]) for _ in range(n_boot)])
    a = (1 - level) / 2
    lo, hi = float(np.quantile(boots, a, method="lower")), float(np.quantile(boots, 1 - a, method="higher"))
    return as_opt(med), [as_opt(lo), as_opt(hi)]


def _median(v: np.ndarray) -> float:
    """Median allowing +inf entries (inf when the middle order statistics are infinite)."""
    s = np.sort(v)
    n = len(s)
    mid = s[(n - 1) // 2: n // 2 + 1]
    return float(mid.mean()) if np.all(np.isfinite(mid)) else math.inf


@dataclass
class ComplexityResult:
    """m*(T) (median over seeds, CI) with every trial the search ran."""

    T: int
    m_star: Optional[float]  # median over seeds of m*_s; None = not learned up to m_max by half the seeds
    ci: list[Optional[float]]  # bootstrap CI of the median (None = unbounded)
    lower: int  # median over seeds of the largest failing m below m*_s
    per_seed: dict[int, Optional[int]]  # m*_s per seed (None = not reached by m_max)
    m_max: int = 0
    n_learned: int = 0  # seeds that reached the threshold
    flag: Optional[str] = None  # seeds disagree wildly / some seeds never learned
    fit: list[dict[str, Any]] = field(default_factory=list)  # per m: trials, how many fit their training set, rate
    fit_rate: float = 1.0  # share of this T's trials that fit their training set
    restarts: dict[str, Any] = field(default_factory=dict)  # how many trials needed re-initialisations
    trials: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict."""
        return asdict(self)


def _bracket(tested: Mapping[int, bool]) -> tuple[int, Optional[int]]:
    """(lo, hi): hi = smallest tried m from which every larger tried m succeeds (None if the largest fails)."""
    hi = None
    for m in sorted(tested, reverse=True):
        if not tested[m]:
            break
        hi = m
    lo = max((m for m in tested if hi is None or m < hi), default=0)
    return lo, hi


def _interior(lo: int, hi: int, k: int, skip: frozenset[int] = frozenset()) -> list[int]:
    """Up to k untried integers strictly inside (lo, hi), geometrically spaced (all of them if few); ``skip``:
    sizes already tried (a trial that did not fit its training set is not tried again)."""
    free = hi - lo - 1 - sum(1 for m in skip if lo < m < hi)
    if free <= k:
        return [m for m in range(lo + 1, hi) if m not in skip]
    out: set[int] = set()
    for j in range(1, k + 1):
        p = int(round(lo * (hi / lo) ** (j / (k + 1))))
        for d in range(hi - lo):  # nearest untried size to the geometric point
            hit = next((q for q in (p - d, p + d) if lo < q < hi and q not in skip and q not in out), None)
            if hit is not None:
                out.add(hit)
                break
    return sorted(out)


def distributed_learner(learner: Learner, info: Any) -> Learner:
    """Under torchrun: a batched learner that trains this rank's round-robin share of each round's (m, seed)
    trials and returns every rank's records in the round's order (all ranks get them, so all take the same next
    round). ``info`` is an :class:`attnlab.distributed.DistInfo`; the learner itself in a single process."""
    if not info.enabled:
        return learner
    from ..distributed import gather_ordered, shard

    def learn(T: int, pairs: list[tuple[int, int]]) -> list[Any]:
        mine = shard(pairs, info)
        if not mine:
            outs: list[Any] = []
        elif getattr(learner, "batched", False):
            outs = list(learner(T, mine))
        else:
            outs = [learner(T, *p) for p in mine]
        return gather_ordered(outs, len(pairs), info, to_all=True)

    learn.batched = True  # type: ignore[attr-defined]
    return learn


def _run_round(learner: Learner, T: int, pairs: list[tuple[int, int]], store: Optional[TrialStore]
               ) -> list[dict[str, Any]]:
    """Run (or fetch from the store) the trials (m, seed) of one round; records with an 'accuracy' key."""
    cached = {p: store.get(T, *p) for p in pairs} if store is not None else {p: None for p in pairs}
    todo = [p for p in pairs if cached[p] is None]

    def record(p: tuple[int, int], out: Any) -> dict[str, Any]:
        rec = dict(out) if isinstance(out, Mapping) else {"accuracy": float(out)}
        if "accuracy" not in rec:
            raise ConfigError("learner must return an accuracy or a dict with key 'accuracy'")
        return {**rec, "T": T, "m": p[0], "seed": p[1]}

    if getattr(learner, "batched", False) and todo:
        outs = learner(T, todo)
        if len(outs) != len(todo):
            raise ResultsError(f"batched learner returned {len(outs)} results for {len(todo)} trials")
        recs = [record(p, o) for p, o in zip(todo, outs)]
        if store is not None:
            store.put_many(recs)
        cached.update(zip(todo, recs))
    else:
        for p in todo:
            rec = record(p, learner(T, *p))
            if store is not None:
                store.put_many([rec])
            cached[p] = rec
    return [cached[p] for p in pairs]


def sample_complexity(
    learner: Learner, T: int, seeds: Iterable[int], cfg: Optional[SearchConfig] = None,
    store: Optional[TrialStore] = None,
) -> ComplexityResult:
    """Find m*_s per seed and their median m*(T) (see module docstring)."""
    cfg = cfg or SearchConfig()
    seeds = list(seeds)
    if not seeds:
        raise ConfigError("--seeds must be >= 1")
    tested: dict[int, dict[int, bool]] = {s: {} for s in seeds}  # fitted trials only: m -> reached threshold
    tried: dict[int, set[int]] = {s: set() for s in seeds}  # every m run (fitted or not)
    trials: list[dict[str, Any]] = []
    while True:
        pairs: list[tuple[int, int]] = []
        for s in seeds:
            lo, hi = _bracket(tested[s])
            if hi is None:
                top = max(tried[s], default=0)
                if top >= cfg.m_max:
                    continue
                start = cfg.m_min if not tried[s] else 2 * top
                block = sorted({min(start * 2**j, cfg.m_max) for j in range(cfg.doubling)})
                pairs += [(m, s) for m in block]
            elif lo > 0 and hi - lo > max(1.0, cfg.rtol * hi):
                pairs += [(m, s) for m in _interior(lo, hi, cfg.points, frozenset(tried[s]))]
        if not pairs:
            break
        for rec in _run_round(learner, T, pairs, store):
            trials.append(rec)
            tried[rec["seed"]].add(rec["m"])
            if rec.get("fit", True):  # a trial that did not fit its training set says nothing about generalisation
                tested[rec["seed"]][rec["m"]] = rec["accuracy"] >= cfg.threshold
    per_seed, lowers = {}, []
    for s in seeds:
        lo, hi = _bracket(tested[s])
        per_seed[s] = hi
        lowers.append(lo)
    med, ci = median_ci(list(per_seed.values()), cfg.n_boot, cfg.level)
    got = [v for v in per_seed.values() if v is not None]
    flag = None
    if len(got) < len(seeds):
        flag = f"{len(seeds) - len(got)} of {len(seeds)} seeds not learned up to m = {cfg.m_max}"
    elif len(got) > 1 and max(got) > cfg.disagree * min(got):
        flag = f"seeds disagree: per-seed m* from {min(got)} to {max(got)} (> {cfg.disagree:g}x)"
    if med is not None and float(med).is_integer():
        med = int(med)
    fit, rate, restarts = fit_summary(trials)
    if rate < 1 and flag is None:
        flag = f"{sum(not r.get('fit', True) for r in trials)} of {len(trials)} trials did not fit their training set"
    return ComplexityResult(T=T, m_star=med, ci=ci, lower=int(np.median(lowers)), per_seed=per_seed,
                            m_max=cfg.m_max, n_learned=len(got), flag=flag, fit=fit, fit_rate=rate,
                            restarts=restarts, trials=trials)


def fit_summary(trials: Sequence[Mapping[str, Any]]) -> tuple[list[dict[str, Any]], float, dict[str, Any]]:
    """Per m: trials, how many fit their training set and the rate; the overall fit rate; restart counts
    (trials that needed at least one re-initialisation, the most any needed) when the learner reports them."""
    by_m: dict[int, list[bool]] = {}
    for r in trials:
        by_m.setdefault(int(r["m"]), []).append(bool(r.get("fit", True)))
    fit = [{"m": m, "n": len(v), "fit": sum(v), "rate": round(sum(v) / len(v), 4)} for m, v in sorted(by_m.items())]
    n = len(trials)
    rate = round(sum(f["fit"] for f in fit) / n, 4) if n else 1.0
    att = [int(r["attempts"]) for r in trials if "attempts" in r]
    restarts = ({"trials": len(att), "restarted": sum(a > 1 for a in att), "max_restarts": max(att) - 1,
                 "rate": round(sum(a > 1 for a in att) / len(att), 4)} if att else {})
    return fit, rate, restarts


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
