"""Top-level Sparsefinder run: train / load an entmax model, capture gold graphs, fit and sweep predictors,
downstream evaluation, and write section ``sparsity`` (results.json), tensors and plots to a run directory."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from ..errors import ConfigError
from ..io import RunDir, write_tensors
from ..seeding import seed_everything
from .entmax_models import (  # noqa: F401  (re-exported: their home was this module)
    CHECKPOINT,
    ENTMAX_MODELS,
    EntmaxModel,
    _check_split,
    _entmax_model,
    _log,
    finetune_made_worse,
    prepare_small,
    stale_settings,
)
from .pareto import TARGET, compare_methods, pareto_table  # noqa: F401  (re-exported)
from .train_entmax import EntmaxTrainConfig

_logger = logging.getLogger(__name__)

SECTION = "sparsity"
PREDICTORS_FILE = "predictors.safetensors"
MIN_EVAL = 16  # fewer held-out windows than this: error bars across windows are not meaningful
log = logging.getLogger(__name__)


def gold_below_target(density_per_layer: Sequence[float], target: float = TARGET) -> Optional[str]:
    """A warning when the gold graphs are less sparse than the reported operating point (overall or in a layer):
    there, even the oracle must drop true edges, so recall@target says more about the model than the predictor."""
    sp = [1.0 - d for d in density_per_layer]
    overall = sum(sp) / len(sp)
    worst = min(range(len(sp)), key=lambda i: sp[i])
    if overall >= target and sp[worst] >= target:
        return None
    return (f"gold graphs are {overall:.3f} sparse (layer {worst}: {sp[worst]:.3f}), below the reported operating "
            f"point (sparsity {target:g}): even the oracle drops true edges there; use an entmax model with sparser "
            f"attention (--model minilm fine-tuned, or more --steps for --model small)")


def _warn(info: dict, quiet: bool, msg: str) -> None:
    """Log a warning (the CLI shows warnings on stderr even with --quiet; rank 0 only under torchrun) and keep it in
    the results."""
    from ..distributed import is_main_process

    if is_main_process():
        log.warning(msg)
    info.setdefault("warnings", []).append(msg)
# Focused default: the learned predictors, two fixed patterns and the oracle bound; methods=METHODS (`--all`,
# every predictor registered with tag 'all') adds distance-thr, lsh, routing, longformer and strided.
DEFAULT_METHODS = ("distance-knn", "quantization", "clustering", "rank", "window", "bigbird", "oracle-topk")


def sparsity(
    out: str | Path, model: str = "small", checkpoint: Optional[str] = None, train: Optional[EntmaxTrainConfig] = None,
    methods: Optional[Sequence[str]] = None, n_fit: int = 128, n_eval: int = 64, n_down: int = 128, rank: int = 4,
    epochs: int = 20, targets: Sequence[float] = (0.8, 0.9, 0.95), seed: int = 0, resume: bool = True,
    hf_seq_len: int = 128, hf_finetune_steps: int = 30, tokenizer: str = "minilm", loss: str = "sum",
    force_window: int = -1, force_cls: bool = False, quiet: bool = False, predictor_path: Optional[str] = None,
    authors_defaults: bool = False, score_rank: int = 4,
) -> dict:
    """Run the whole Sparsefinder evaluation and write section ``sparsity`` of ``out``/results.json.

    ``model`` is 'small' (our entmax transformer, trained per ``train`` or loaded from ``checkpoint``) or an
    HF model name / folder ('minilm') whose softmax is swapped for entmax (optionally fine-tuned for
    ``hf_finetune_steps`` self-distillation steps, default 30, cached; see :mod:`attnlab.sparsity.finetune_hf`; the
    gold graphs come from the fine-tuned model and ``model.gold_graphs_from`` says so). ``tokenizer``: model folder
    / alias whose tokenizer reads the corpus for the small model. ``loss``: projector loss, ``sum`` (Sparsefinder)
    or ``pair``. ``force_window`` >= 0 and ``force_cls`` add forced edges to every predictor (off by default);
    ``authors_defaults`` sets the public Sparsefinder code's defaults (forced window 3, i.e. |i - j| <= 1, and CLS
    edges). ``score_rank``: rank of the ``rank`` predictor's scorer. ``predictor_path``: load fitted predictors
    (safetensors + JSON written to every run dir as ``predictors.safetensors``) instead of fitting. With ``resume``
    a finished section with the same config is
    returned as is, a cached checkpoint is reused and an interrupted training continues from its partial
    checkpoint (``entmax_model.partial.safetensors``, every ``train.checkpoint_every`` steps).

    Under torchrun (``python -m torch.distributed.run --nproc-per-node K -m attnlab sparsity run ...``; gloo, also
    with ``--device cuda``, where each rank's model runs on its own GPU) rank 0 prepares the model (training /
    fine-tuning, cached) while the others wait and then load it; every rank captures its round-robin share of the fit, evaluation and downstream windows, learned
    predictors fit data-parallel (global minibatches, all-reduced gradients and statistics, per-window seeded
    sampling), per-window metrics are gathered in window order and downstream sums all-reduced, so every rank holds
    the numbers of one process (to float tolerance); rank 0 alone writes the run directory. ``sharded_seconds``
    times that sharded part (capture + fit + sweep + downstream); ``ranks`` lists each rank's windows and times.
    """
    train = train or EntmaxTrainConfig()
    if authors_defaults:
        force_window, force_cls = max(force_window, 1), True
    methods = _check_args(methods, loss, n_fit, n_eval, n_down)  # --all: every PREDICTORS.names("all")
    run = RunDir(out)
    train_cfg = {k: v for k, v in asdict(train).items() if k != "checkpoint_every"}  # cadence: same results
    config = {"model": model, "checkpoint": checkpoint, "train": train_cfg, "methods": methods, "n_fit": n_fit,
              "n_eval": n_eval, "n_down": n_down, "rank": rank, "epochs": epochs, "targets": list(targets), "seed": seed,
              "hf_seq_len": hf_seq_len, "hf_finetune_steps": hf_finetune_steps, "loss": loss,
              "force_window": force_window, "force_cls": force_cls, "predictor_path": predictor_path,
              "authors_defaults": authors_defaults, "score_rank": score_rank}
    dist, quiet, done = _begin(run, config, resume, quiet)
    if done is not None:
        return done
    seed_everything(seed)
    t_start = time.time()
    info: dict = {"config": config, "complete": False}
    em = _load_model(run, dist, model, train, resume, checkpoint=checkpoint, quiet=quiet, tokenizer=tokenizer,
                     n_fit=n_fit, n_eval=n_eval, n_down=n_down, hf_seq_len=hf_seq_len,
                     hf_finetune_steps=hf_finetune_steps, seed=seed)
    setting_id = _model_info(info, em, quiet, n_fit, n_eval)
    shards, do_down, mine = _shards(dist, em, n_down)
    t_work = time.perf_counter()  # the sharded part starts: capture, fit, sweep, downstream
    fit, ev = _capture_gold(em, dist, shards["eval"], info, mine, quiet)
    setting = _setting(setting_id, ev, em)
    results, fitted = _fit_and_sweep(config, fit, ev, setting, shards, info, mine, quiet)
    _save_fits(run, dist, config, fitted, setting, info)
    _downstream_step(em, dist, shards["down"], do_down, fitted, results, targets, n_down, info, mine, quiet)
    return _finish(run, dist, info, mine, results, fitted, ev, t_start, t_work)


def _begin(run: RunDir, config: dict, resume: bool, quiet: bool) -> tuple[Any, bool, Optional[dict]]:
    """Start the process group (gloo even with --device cuda: every collective moves CPU tensors; the model runs on
    this rank's device) and write the config; returns (dist, quiet, the finished section kept by --resume or None)."""
    from ..distributed import barrier, init_distributed

    dist = init_distributed("cpu")
    quiet = quiet or not dist.is_main  # rank 0 logs progress
    prev = run.section(SECTION)
    if resume and prev and prev.get("config") == config and prev.get("complete"):
        _log(quiet, f"{run.path}: section '{SECTION}' already complete with these settings; kept (resume)")
        return dist, quiet, prev
    barrier(dist)  # every rank has read the section before rank 0 writes anything
    if dist.is_main:
        run.write_config(SECTION, config)
    return dist, quiet, None


def _setting(setting_id: str, ev: list, em: EntmaxModel) -> dict:
    """What fitted predictors are valid for (checked when --predictor-path loads them)."""
    return {"model": setting_id, "seq_len": ev[0].n, "n_layers": len(ev), "n_heads": ev[0].q.shape[1],
            "d_head": ev[0].q.shape[-1], "alpha": [float(a) if not isinstance(a, torch.Tensor) else "learned"
                                                    for a in em.alphas]}


def _save_fits(run: RunDir, dist, config: dict, fitted: dict, setting: dict, info: dict) -> None:
    """Rank 0 saves the fitted predictors (unless they were loaded, --predictor-path); the setting into ``info``."""
    if not config["predictor_path"] and dist.is_main:
        from .predictors.persist import save_predictors

        info["predictors"] = save_predictors(run.file(PREDICTORS_FILE), fitted, setting).name
    info["setting"] = setting


def _check_args(methods: Optional[Sequence[str]], loss: str, n_fit: int, n_eval: int, n_down: int) -> list[str]:
    """The predictor names to run (DEFAULT_METHODS if none), each registered; ConfigError on a bad --loss or count."""
    from .predictors import PREDICTORS

    methods = list(methods or DEFAULT_METHODS)
    for m in methods:
        PREDICTORS.get(m)  # an unknown name is a ConfigError listing the registered ones
    if loss not in ("sum", "pair"):
        raise ConfigError(f"--loss must be sum or pair (got {loss!r})")
    if min(n_fit, n_eval) < 1 or n_down < 0:
        raise ConfigError("--n-fit and --n-eval must be >= 1, --n-down >= 0")
    return methods


def _shard_of(ids: torch.Tensor, d) -> torch.Tensor:
    """This rank's windows of ``ids`` (round-robin)."""
    from ..distributed import shard_indices

    return ids[shard_indices(len(ids), d)]


def _load_model(run: RunDir, dist, model: str, train: EntmaxTrainConfig, resume: bool, **prep: object) -> EntmaxModel:
    """Rank 0 trains / fine-tunes (cached); the others wait, then load the cached model (no second training)."""
    from ..distributed import barrier, device_for

    prep = dict(run=run, name=model, train=replace(train, device=device_for(dist, train.device)), **prep)
    if dist.is_main:
        em = _entmax_model(model)(resume=resume, **prep)
    barrier(dist)
    if not dist.is_main:
        em = _entmax_model(model)(resume=True, main=False, **prep)
    return em


def _model_info(info: dict, em: EntmaxModel, quiet: bool, n_fit: int, n_eval: int) -> str:
    """Move the model's info (and warnings) into ``info``, warn about too few windows; returns the setting id."""
    setting_id = em.info.pop("setting_id")
    for w in em.info.pop("warnings", []):
        _warn(info, quiet, w)
    if "downstream_skipped" in em.info:
        info["downstream_skipped"] = em.info.pop("downstream_skipped")
    info["model"] = em.info
    if len(em.eval_ids) < n_eval:
        _warn(info, quiet, f"only {len(em.eval_ids)} held-out evaluation windows available (--n-eval {n_eval} "
                           "asked): the corpus is too small")
    if len(em.eval_ids) < MIN_EVAL:
        _warn(info, quiet, f"{len(em.eval_ids)} evaluation windows < {MIN_EVAL}: spreads across windows are unreliable")
    if len(em.fit_ids) < n_fit:
        _warn(info, quiet, f"only {len(em.fit_ids)} fit windows available (--n-fit {n_fit} asked)")
    return setting_id


def _shards(dist, em: EntmaxModel, n_down: int) -> tuple[dict, bool, dict]:
    """This rank's window shards {'fit', 'eval', 'down'}, whether downstream runs, and the rank's record; every
    split must give each rank some work."""
    from ..distributed import WindowShard, barrier, require_work_per_rank

    require_work_per_rank(len(em.fit_ids), dist, "--n-fit")
    require_work_per_rank(len(em.eval_ids), dist, "--n-eval")
    do_down = n_down > 0 and len(em.down_ids) > 0
    if do_down:
        require_work_per_rank(len(em.down_ids), dist, "--n-down")
    shards = {"fit": WindowShard(len(em.fit_ids), dist), "eval": WindowShard(len(em.eval_ids), dist),
              "down": WindowShard(len(em.down_ids), dist)}
    mine = {"rank": dist.rank, "windows": {"fit": shards["fit"].n_local, "eval": shards["eval"].n_local,
                                           "down": shards["down"].n_local if do_down else 0}}
    if dist.enabled:
        _logger.info(f"rank {dist.rank}/{dist.world_size}: {mine['windows']['fit']} fit, {mine['windows']['eval']} eval, "
                     f"{mine['windows']['down']} downstream windows")
    barrier(dist)
    return shards, do_down, mine


def _capture_gold(em: EntmaxModel, dist, ev_shard, info: dict, mine: dict, quiet: bool) -> tuple[list, list]:
    """Capture q/k and the gold entmax graphs of this rank's fit and eval windows; gold sparsity into ``info``."""
    from .evaluate import capture_layers, gold_density as gold_density_of

    _log(quiet, f"capturing q/k and gold entmax graphs ({len(em.fit_ids)} fit, {len(em.eval_ids)} eval windows"
                f"{f' over {dist.world_size} processes' if dist.enabled else ''})")
    t0 = time.time()
    fit = capture_layers(em.source, _shard_of(em.fit_ids, dist), alpha=em.alphas)
    ev = capture_layers(em.source, _shard_of(em.eval_ids, dist), alpha=em.alphas)
    info["capture_seconds"] = mine["capture_seconds"] = time.time() - t0
    gold_density = gold_density_of(ev, ev_shard)
    info["gold"] = {"density_per_layer": gold_density, "sparsity": 1.0 - sum(gold_density) / len(gold_density),
                    "seq_len": ev[0].n, "n_layers": len(ev), "n_heads": ev[0].q.shape[1], "d_head": ev[0].q.shape[-1]}
    _log(quiet, f"gold graph sparsity {info['gold']['sparsity']:.3f} (per layer {[round(1 - d, 3) for d in gold_density]})")
    low = gold_below_target(gold_density, TARGET)
    if low:
        _warn(info, quiet, low)
    return fit, ev


def _fit_and_sweep(config: dict, fit: list, ev: list, setting: dict, shards: dict, info: dict, mine: dict,
                   quiet: bool) -> tuple[dict, dict]:
    """Fit (or load, --predictor-path) every predictor of ``config`` and sweep it on the eval windows; the results
    and timings go into ``info`` / ``mine``. Returns (results, fitted predictors) per method."""
    from .evaluate import fit_layers, sweep_method
    from .predictors import PREDICTORS, Projector

    c = config
    projectors = [Projector(c["rank"], epochs=c["epochs"], seed=c["seed"] + l, loss=c["loss"]) for l in range(len(fit))]
    results, fitted, fit_seconds = {}, {}, {}
    loaded = {}
    if c["predictor_path"]:
        from .predictors.persist import load_predictors

        loaded = load_predictors(c["predictor_path"], c["methods"], setting)
        _log(quiet, f"loaded fitted predictors from {c['predictor_path']}")
    for m in c["methods"]:
        t0 = time.time()
        if m in loaded:
            fitted[m] = loaded[m]
            for p in fitted[m]:
                p.force_window, p.force_cls = int(c["force_window"]), bool(c["force_cls"])
        else:
            fitted[m] = fit_layers(m, fit, rank=c["rank"], epochs=c["epochs"], seed=c["seed"], projectors=projectors,
                                   force_window=c["force_window"], force_cls=c["force_cls"], shard=shards["fit"],
                                   **({"score_rank": c["score_rank"]} if m in PREDICTORS.names("trained") else {}))
        fit_seconds[m] = time.time() - t0
        results[m] = sweep_method(m, fitted[m], ev, target=TARGET, shard=shards["eval"])
        results[m]["fit_seconds"] = fit_seconds[m]
        r = results[m][f"recall_at_{TARGET:g}"]
        _log(quiet, f"  {m:14s} recall@{TARGET:g} = {'n/a' if r is None else f'{r:.3f}'}  "
                    f"(fit {fit_seconds[m]:.1f}s, sweep {results[m]['seconds']:.1f}s)")
    info["projector_loss"] = [p.history for p in projectors]
    info["methods"] = results
    info["recall_at_0.9"] = {m: results[m][f"recall_at_{TARGET:g}"] for m in c["methods"]}
    info["comparison"] = compare_methods(results, TARGET)
    mine["fit_seconds"] = sum(fit_seconds.values())
    mine["sweep_seconds"] = sum(r["seconds"] for r in results.values())
    return results, fitted


def _downstream_step(em: EntmaxModel, dist, down_shard, do_down: bool, fitted: dict, results: dict,
                     targets: Sequence[float], n_down: int, info: dict, mine: dict, quiet: bool) -> None:
    """Downstream evaluation with attention restricted to the predicted graphs, or why it was skipped."""
    from .evaluate import downstream

    t0 = time.time()
    if do_down:  # (an empty downstream split was reported by _check_split)
        _log(quiet, f"downstream: attention restricted to predicted graphs ({len(em.down_ids)} windows)")
        info["downstream"] = downstream(em.source, em.task(_shard_of(em.down_ids, dist), down_shard), em.alphas,
                                        fitted, results, targets)
    elif n_down > 0:
        reason = (f"downstream evaluation NOT run: no held-out windows left after the {len(em.eval_ids)} evaluation "
                  f"windows (--n-down {n_down} asked); use a larger corpus or lower --n-eval")
        _warn(info, quiet, reason)
        info["downstream"] = {"skipped": reason}
    else:
        info["downstream"] = {"skipped": "downstream evaluation not requested (--n-down 0)"}
    info["downstream_seconds"] = mine["downstream_seconds"] = time.time() - t0


def _finish(run: RunDir, dist, info: dict, mine: dict, results: dict, fitted: dict, ev: list, t_start: float,
            t_work: float) -> dict:
    """Time the sharded part (since ``t_work``), gather every rank's record; rank 0 writes tensors, plots, views and
    the complete section (the others wait)."""
    from ..distributed import barrier, gather_lists

    info["sharded_seconds"] = mine["sharded_seconds"] = time.perf_counter() - t_work
    info["world_size"] = dist.world_size
    info["ranks"] = gather_lists([mine], dist, to_all=True)
    if not dist.is_main:  # rank 0 writes the run directory
        barrier(dist)
        return info
    _write_artifacts(run, info, results, ev)
    from ..report.views import save_sparsity_views

    save_sparsity_views(run, fitted, ev, info["operating_points_0.9"])
    info["wall_s"] = time.time() - t_start
    info["complete"] = True
    run.write_section(SECTION, info)
    barrier(dist)  # the others return once the section is written
    return info


def _write_artifacts(run: RunDir, info: dict, results: dict, ev) -> None:
    """Per-head grids at the operating point closest to sparsity 0.9 (safetensors) and plots."""
    from .evaluate import closest_knob
    from .plots import head_recall_plot, pareto_plot, training_plot

    tensors, plots, op = {}, {}, {}
    for m, res in results.items():
        knob, s = closest_knob(res, TARGET)
        pt = next(p for p in res["points"] if p["knob"] == knob)
        op[m] = {"knob": knob, "sparsity": s}
        for metric in ("recall", "sparsity", "exact", "cost", "comp_sparsity"):
            tensors[f"{m}.{metric}"] = torch.tensor(pt["grid"][metric], dtype=torch.float32)
        safe = m.replace("/", "_")
        plots[f"heads_{safe}"] = head_recall_plot(pt["grid"]["recall"], m, s, run.file(f"sparsity_heads_{safe}.png")).name
    write_tensors(run.file("sparsity_heads.safetensors"), tensors, {"operating_points": op})
    plots["pareto"] = pareto_plot(results, run.file("sparsity_pareto.png"), "sparsity", info["gold"]["sparsity"]).name
    plots["cost"] = pareto_plot(results, run.file("sparsity_cost.png"), "cost").name
    hist = info["model"].get("train_history") or {}
    if hist.get("step"):
        plots["training"] = training_plot(hist, run.file("sparsity_training.png")).name
    info["operating_points_0.9"] = op
    info["plots"] = plots
    info["tensors"] = "sparsity_heads.safetensors"
