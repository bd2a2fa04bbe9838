"""The full experiment: m*(T) of the bounded-norm attention head and of a contrast learner, law fits,
the norm/sample trade-off, the attention probe, plots.

Results go to the run directory: trials in ``variables_trials.json`` (main model),
``variables_contrast_trials.json`` and ``variables_norm_trials.json`` (one write per round, resumable),
the summary in the ``variables`` section of ``results.json`` (rewritten after every T), plots as PNG.

Under ``torchrun`` (one GPU per rank) with at least as many T's as ranks, each rank runs the whole m* search of its
own T's (snake order over the sorted list) and saves its trials to its own file; at the end rank 0 merges them into
the trials file (T order) and writes the section, fits, probe and plots. With fewer T's than ranks (and for the
norm sweep) every round's (m, seed) trials are sharded round-robin instead: all ranks receive every record and
take the same next round, rank 0 saves the merged trials once per round. The trials are those of one process
(the same rounds and seeds), and a resume reads the saved trials (and rank files) on every rank.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Optional, Union

from ..distributed import DistInfo, broadcast_object, device_for, init_distributed
from ..errors import AttnlabError
from ..io import RunDir
from .complexity import Learner, TrialStore, distributed_learner, sample_complexity
from .config import CONTRASTS, DEFAULT_TS, MODELS, SHARED, SweepConfig  # noqa: F401 (the experiment's names)
from .ensemble import Bounds, EnsembleConfig, Member, train_ensemble
from .fit import MIN_POINTS
from .probe import mass_at_mstar
from .tasks import make_task
from .train import resolve_device, train_model

_log = logging.getLogger(__name__)

SECTION = "variables"
TRIALS_FILE = "variables_trials.json"
CONTRAST_TRIALS_FILE = "variables_contrast_trials.json"
NORM_TRIALS_FILE = "variables_norm_trials.json"
def ensemble_learner(cfg: SweepConfig, ens: EnsembleConfig, device: str) -> Learner:
    """A batched learner: (T, [(m, seed), ...]) -> records, training the trials as ensembles."""

    def learn(T: int, pairs: list[tuple[int, int]]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        chunk = max(1, cfg.max_members)
        for i in range(0, len(pairs), chunk):
            part = pairs[i:i + chunk]
            members = [Member(make_task(cfg.task, T, cfg.s, sd, cfg.balanced, cfg.noise), m, sd) for m, sd in part]
            out += train_ensemble(members, ens, device)
        return out

    learn.batched = True  # type: ignore[attr-defined]
    return learn


def make_learner(cfg: SweepConfig, device: str = "cpu") -> Learner:
    """The main learner: the bounded-norm head (batched) or the SmallTransformer (one trial at a time)."""
    if cfg.model == "bounded":
        return ensemble_learner(cfg, cfg.bounded, device)

    def learn(T: int, m: int, seed: int) -> dict[str, Any]:
        task = make_task(cfg.task, T, cfg.s, seed, cfg.balanced, cfg.noise)
        r = train_model(task, m, cfg.train, device=device, seed=seed)
        return {"accuracy": r.test_acc, "train_acc": r.train_acc, "fit": r.train_acc >= cfg.bounded.fit_acc,
                "val_acc": r.val_acc, "steps": r.steps,
                "best_step": r.best_step, "seconds": round(r.seconds, 3), "norm_qk": r.norms["qk_max"],
                "norm_v": max(r.norms["v"]), "norm_out": r.norms["out"]}

    return learn


def _summary(res, t1: float) -> dict[str, Any]:
    """JSON summary of one ComplexityResult: m*, CI, per seed, flags, the largest norms of its trials and (bounded
    head) the readout attention mass on the relevant positions of each seed's trial at its m*_s."""
    d = res.to_dict()
    trials = d.pop("trials")
    d["n_trials"] = len(trials)
    d["seconds"] = round(time.perf_counter() - t1, 2)
    norms = sorted({k for r in trials for k in r if k.startswith("norm_")})
    d["norms_max"] = {k[5:]: max(r[k] for r in trials if k in r) for k in norms}
    d["attn"] = mass_at_mstar(res.per_seed, trials)
    return d


def _log_result(log: Callable[[str], None], name: str, d: dict[str, Any]) -> None:
    """One progress line per T."""
    from ..textfmt import interval

    rs = d.get("restarts") or {}
    ci = interval(d["ci"], len(d["per_seed"]))
    log(f"{name:>11} T={d['T']:5d}  m*={d['m_star']}  CI {ci}  per-seed={list(d['per_seed'].values())}"
        f"  fit {d.get('fit_rate', 1):.2f}" + (f", restarted {rs['restarted']}/{rs['trials']}" if rs else "") +
        f"{'  FLAG: ' + d['flag'] if d.get('flag') else ''}  {d['seconds']:.1f}s")


def _plan(cfg: SweepConfig, section: dict[str, Any], learner: Learner, contrast_learner: Optional[Learner]) -> list:
    """The sweeps to run, in order (name, results list, learner, trials file, fingerprint, Ts): the model over every
    T first, then the contrast (up to --contrast-max-T), so a time budget cuts the contrast before the model."""
    if cfg.contrast != "none":
        section["contrast"] = {"model": cfg.contrast, "results": []}
    plan = [(cfg.model, section["results"], learner, TRIALS_FILE, cfg.fingerprint(cfg.model), list(cfg.Ts))]
    if section["contrast"] is not None:
        cts = [T for T in cfg.Ts if cfg.contrast_max_T is None or T <= cfg.contrast_max_T]
        plan.append((cfg.contrast, section["contrast"]["results"], contrast_learner, CONTRAST_TRIALS_FILE,
                     cfg.fingerprint("mlp"), cts))
    return plan


def run_sweep(
    cfg: SweepConfig, out: Union[str, Path, RunDir], device: str = "cpu", resume: bool = False,
    learner: Optional[Learner] = None, log: Optional[Callable[[str], None]] = None, plots: bool = True,
    contrast_learner: Optional[Learner] = None, info: Optional[DistInfo] = None,
) -> dict[str, Any]:
    """Run the sweeps (model, contrast, norm trade-off), fit, probe and plot; write and return the section
    (under torchrun: trials sharded over ranks, rank 0 writes; other ranks return the section without analysis)."""
    log = log or _log.info
    run = out if isinstance(out, RunDir) else RunDir(out)
    base = str(resolve_device(device))
    info = info or init_distributed(base)
    dev = device_for(info, base)  # 'cuda' -> 'cuda:<local rank>' under torchrun
    learner = learner or make_learner(cfg, dev)
    if cfg.contrast == "mlp" and contrast_learner is None:
        contrast_learner = ensemble_learner(cfg, cfg.mlp, dev)
    if not info.is_main:
        log = lambda _: None  # noqa: E731
    cfg_dict = asdict(cfg)
    if info.is_main:
        run.write_config(SECTION, {**cfg_dict, "device": dev})
    if len(cfg.Ts) < MIN_POINTS:
        log(f"note: {len(cfg.Ts)} values of --T; the law fits need at least {MIN_POINTS} with a reached m*")
    t0 = time.perf_counter()
    section: dict[str, Any] = {"config": cfg_dict, "device": dev, "model": cfg.model, "results": [],
                               "skipped_T": [], "contrast": None, "world_size": info.world_size}

    def write() -> None:
        if info.is_main:
            run.write_section(SECTION, section)

    plan = _plan(cfg, section, learner, contrast_learner)

    def budget_spent() -> bool:  # this rank's clock
        return cfg.budget_s is not None and time.perf_counter() - t0 > cfg.budget_s

    def over_budget() -> bool:  # rank 0's clock decides, so every rank takes the same branch
        return broadcast_object(budget_spent(), info)

    modes = []
    for name, results, lrn, fname, fp, Ts in plan:
        sharded = info.world_size > 1 and len(Ts) >= info.world_size
        search, spent = (_search_sharded_T, budget_spent) if sharded else (_search_each_T, over_budget)
        modes.append(search.__name__.strip("_"))
        search(cfg, run.file(fname), fp, resume, name, results, lrn, Ts, section, t0, spent, info, log, write)
    section["sharding"] = modes if info.enabled else None

    if cfg.norm_sweep and not over_budget():
        _norm_sweep(cfg, run, section, dev, resume, log, info)
        write()
    if cfg.probe_bounds and not over_budget():
        from .bound_probe import run_probe_bounds

        section["probe_bounds"] = run_probe_bounds(cfg, run, section, dev, resume, log, ensemble_learner, info)
        write()
    section["sweep_seconds"] = round(time.perf_counter() - t0, 2)  # the trials alone (what torchrun spreads)
    if info.is_main:
        _analyse(cfg, run, section, dev, log, plots)
    section["wall_s"] = round(time.perf_counter() - t0, 2)
    write()
    return section


def _search_each_T(cfg: SweepConfig, path: Path, fp: dict[str, Any], resume: bool, name: str,
                   results: list[dict[str, Any]], learner: Learner, Ts: list[int], section: dict[str, Any],
                   t0: float, spent: Callable[[], bool], info: DistInfo, log: Callable[[str], None],
                   write: Callable[[], None]) -> None:
    """One T after another; under torchrun each round's (m, seed) trials are sharded over the ranks (used when
    there are fewer T's than ranks). Rank 0 saves the merged trials after every round."""
    store = TrialStore(path, fp, resume=resume, write=info.is_main)
    lrn = distributed_learner(learner, info)
    for T in Ts:
        if spent():  # rank 0's clock decides (broadcast), so every rank skips the same T
            section["skipped_T"].append({"learner": name, "T": T})
            continue
        t1 = time.perf_counter()
        d = _summary(sample_complexity(lrn, T, cfg.seed_list(), cfg.search, store), t1)
        results.append(d)
        _log_result(log, name, d)
        section["wall_s"] = round(time.perf_counter() - t0, 2)
        write()


def zigzag(n: int, world: int) -> list[list[int]]:
    """Indices 0..n-1 dealt to ``world`` ranks in snake order (0,1,..,w-1,w-1,..,0,...): with costs growing
    along the list (larger T), every rank gets a similar share."""
    parts: list[list[int]] = [[] for _ in range(world)]
    for i in range(n):
        b, pos = divmod(i, world)
        parts[pos if b % 2 == 0 else world - 1 - pos].append(i)
    return parts


def _search_sharded_T(cfg: SweepConfig, path: Path, fp: dict[str, Any], resume: bool, name: str,
                      results: list[dict[str, Any]], learner: Learner, Ts: list[int], section: dict[str, Any],
                      t0: float, spent: Callable[[], bool], info: DistInfo, log: Callable[[str], None],
                   write: Callable[[], None]) -> None:
    """Under torchrun with at least one T per rank: each rank runs the whole m* search of its own T's (snake order)
    on its GPU, with no collective until the end, saving its trials to its own file after every round; rank 0 then
    merges every rank's trials into ``path`` (T order) and removes the rank files. A resume reads ``path`` and any
    rank files left by an interrupted run. The trials are the ones a single process runs (same rounds, seeds)."""
    from ..distributed import gather_lists

    store = TrialStore(path, fp, resume=resume, write=True, save_to=TrialStore.rank_file(path, info.rank))
    mine: list[tuple[int, Optional[dict[str, Any]]]] = []
    for i in zigzag(len(Ts), info.world_size)[info.rank]:
        T = Ts[i]
        if spent():  # this rank's own clock (no collective until the end)
            mine.append((i, None))
            continue
        t1 = time.perf_counter()
        d = _summary(sample_complexity(learner, T, cfg.seed_list(), cfg.search, store), t1)
        d["rank"] = info.rank
        mine.append((i, d))
        _log_result(log, name, d)
    done = gather_lists(mine, info)
    trials = gather_lists(list(store.trials.values()), info)
    if not info.is_main:
        return
    by_index = dict(done)
    for i, T in enumerate(Ts):
        if by_index[i] is None:
            section["skipped_T"].append({"learner": name, "T": T})
        else:
            results.append(by_index[i])
            if by_index[i]["rank"] != 0:
                _log_result(log, f"{name}@rank{by_index[i]['rank']}", by_index[i])
    order = {T: i for i, T in enumerate(Ts)}
    merged = TrialStore(path, fp, resume=resume, write=True)
    merged.put_many(sorted(trials, key=lambda r: order.get(r["T"], len(Ts))))
    for f in merged.rank_files():
        f.unlink()
    section["wall_s"] = round(time.perf_counter() - t0, 2)
    write()


def _norm_sweep(cfg: SweepConfig, run: RunDir, section: dict[str, Any], device: str, resume: bool,
                log: Callable[[str], None], info: Optional[DistInfo] = None) -> None:
    """m* at one T for each qk bound in ``cfg.norm_sweep`` (other bounds unchanged)."""
    T = cfg.norm_T or cfg.Ts[len(cfg.Ts) // 2]
    out: dict[str, Any] = {"T": T, "bound": "qk", "results": []}
    section["norm_sweep"] = out
    base = cfg.bounded.bounds or Bounds(emb=None, qk=None, v=None, out=None)
    for b in cfg.norm_sweep:
        ens = EnsembleConfig(**{**asdict(cfg.bounded), "bounds": Bounds(**{**asdict(base), "qk": b})})
        info = info or DistInfo()
        store = TrialStore(run.file(NORM_TRIALS_FILE.replace(".json", f"_qk{b:g}.json")),
                           {**cfg.fingerprint("bounded"), "train": asdict(ens)}, resume=resume, write=info.is_main)
        t1 = time.perf_counter()
        lrn = distributed_learner(ensemble_learner(cfg, ens, device), info)
        d = _summary(sample_complexity(lrn, T, cfg.seed_list(), cfg.search, store), t1)
        d["qk_bound"] = b
        out["results"].append(d)
        _log_result(log, f"qk<={b:g}", d)
        if info.is_main:
            run.write_section(SECTION, section)


def _fit_into(target: dict[str, Any], results: list[dict[str, Any]], log: Callable[[str], None], name: str) -> None:
    """Fit the laws to the reached points of ``results``; record 'fits' or 'fit_error' and 'not_learned'."""
    from .fit import fit_laws

    done = [r for r in results if r["m_star"] is not None]
    target["not_learned"] = [{"T": r["T"], "m_max": r["m_max"]} for r in results if r["m_star"] is None]
    for r in target["not_learned"]:
        log(f"{name}: T={r['T']} not learned up to m = {r['m_max']} (not a fitted point)")
    try:
        fits = fit_laws([r["T"] for r in done], [r["m_star"] for r in done],
                        per_seed=[list(r["per_seed"].values()) for r in done])
        target["fits"], target["fit_error"] = fits.to_dict(), None
        from ..textfmt import interval

        log(f"{name} fits: log R2={fits.log.r2:.3f} (CI {interval(fits.log.ci.get('r2'))}), "
            f"b={fits.log.params['b']:.3g} CI {interval(fits.log.ci['b'])}; power c="
            f"{fits.power.params['c']:.3g} CI {interval(fits.power.ci['c'])}; "
            f"verdict: {fits.verdict} ({fits.reason})")
    except AttnlabError as e:
        target["fits"], target["fit_error"] = None, str(e)
        log(f"{name} fits skipped: {e}")


def _analyse(cfg: SweepConfig, run: RunDir, section: dict[str, Any], device: str,
             log: Callable[[str], None], plots: bool) -> None:
    """Fit the laws, probe attention and draw the plots into ``section``."""
    _fit_into(section, section["results"], log, cfg.model)
    if section.get("contrast"):
        _fit_into(section["contrast"], section["contrast"]["results"], log, cfg.contrast)
    section["plots"] = []
    done = [r for r in section["results"] if r["m_star"] is not None]
    if cfg.probe and done:
        section["probe"] = _probe(cfg, done[-1], device)
        p = section["probe"]
        log(f"probe at T={p['T']}: readout attention mass on the {cfg.s} relevant positions "
            f"median {p['mass_median']:.3f} over seeds {p['mass_per_seed']}")
    if plots:
        from .plots import COMPLEXITY_PNG, NORM_PNG, PROBE_PNG, plot_complexity, plot_norm_sweep, plot_probe

        if section["results"] or (section.get("contrast") or {}).get("results"):
            plot_complexity(section, run.file(COMPLEXITY_PNG))
            section["plots"].append(COMPLEXITY_PNG)
        if section.get("probe") or section.get("probe_bounds"):
            caps = {r["T"]: _cap(cfg, r["T"]) for r in section["results"]} if cfg.model == "bounded" else None
            plot_probe(section.get("probe") or {"s": cfg.s}, run.file(PROBE_PNG), section["results"],
                       section.get("probe_bounds"), caps)
            section["plots"].append(PROBE_PNG)
        if section.get("norm_sweep", {}).get("results"):
            plot_norm_sweep(section["norm_sweep"], run.file(NORM_PNG))
            section["plots"].append(NORM_PNG)


def _probe(cfg: SweepConfig, top: dict[str, Any], device: str) -> dict[str, Any]:
    """Train each learned seed at its own m*_s at the largest reached T and probe the readout attention."""
    from .probe import attention_probe

    T = top["T"]
    pairs = [(m, int(sd)) for sd, m in top["per_seed"].items() if m is not None]
    per_seed: dict[str, Any] = {}
    if cfg.model == "bounded" and top.get("attn"):  # every trial recorded its attention: no retraining
        per_seed = dict(top["attn"]["per_seed"])
    elif cfg.model == "bounded":
        from .ensemble import bounded_probe

        members = [Member(make_task(cfg.task, T, cfg.s, sd, cfg.balanced, cfg.noise), m, sd) for m, sd in pairs]
        recs, model, chosen = train_ensemble(members, cfg.bounded, device, return_model=True)
        for (m, sd), e, rec, mb in zip(pairs, chosen, recs, members):
            per_seed[str(sd)] = {"m": m, "test_acc": rec["accuracy"], **bounded_probe(model, e, mb.task)}
    else:
        for m, sd in pairs:
            task = make_task(cfg.task, T, cfg.s, sd, cfg.balanced, cfg.noise)
            r = train_model(task, m, cfg.train, device=device, seed=sd)
            per_seed[str(sd)] = {"m": m, "test_acc": r.test_acc, **attention_probe(r.model, task)}
    import numpy as np

    # per seed: the readout's mass on the relevant positions, averaged over heads (and layers)
    mass = {sd: float(np.mean(p["mass"])) for sd, p in per_seed.items()}
    return {"T": T, "s": cfg.s, "per_seed": per_seed, "mass_per_seed": {k: round(v, 4) for k, v in mass.items()},
            "mass_median": float(np.median(list(mass.values()))) if mass else float("nan"),
            "uniform_mass": cfg.s / (T + 1), "cap": _cap(cfg, T)}


def _cap(cfg: SweepConfig, T: int) -> Optional[float]:
    """The readout mass on the relevant positions the bounded head's norm bounds allow at T (None: other models)."""
    from .probe import mass_cap

    b = cfg.bounded.bounds
    if cfg.model != "bounded" or b is None:
        return None
    return mass_cap(T, cfg.s, b.emb, b.qk, cfg.bounded.d_model // cfg.bounded.n_heads)


def run_variables(out: Union[str, Path], device: str = "cpu", resume: bool = False, progress: bool = True,
                  **settings: Any) -> dict[str, Any]:
    """Python mirror of `attnlab variables sweep`: ``settings`` are :class:`SweepConfig` fields
    (``train=`` / ``bounded=`` / ``mlp=`` / ``search=`` may be dicts of their config fields)."""
    cfg = SweepConfig(**settings)
    return run_sweep(cfg, out, device=device, resume=resume, log=_log.info if progress else _log.debug)
