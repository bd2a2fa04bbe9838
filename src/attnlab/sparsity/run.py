"""Top-level Sparsefinder run: train / load an entmax model, capture gold graphs, fit and sweep predictors,
downstream evaluation, and write section ``sparsity`` (results.json), tensors and plots to a run directory."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from ..config import fingerprint
from ..errors import ConfigError, ResultsError
from ..io import RunDir, write_tensors
from ..registry import Registry
from ..seeding import seed_everything
from .metrics import pareto_front
from .train_entmax import EntmaxTrainConfig

_logger = logging.getLogger(__name__)

SECTION = "sparsity"
CHECKPOINT = "entmax_model.safetensors"
PREDICTORS_FILE = "predictors.safetensors"
TARGET = 0.9
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


def finetune_made_worse(mlm: dict) -> Optional[str]:
    """A warning when entmax fine-tuning left the held-out MLM probe loss above the untuned entmax swap's."""
    ft, nf = mlm.get("entmax_finetuned"), mlm.get("entmax_no_finetune")
    if not isinstance(ft, dict) or not isinstance(nf, dict) or ft["loss"] <= nf["loss"]:
        return None
    se = (ft.get("loss_se", 0.0) ** 2 + nf.get("loss_se", 0.0) ** 2) ** 0.5
    return (f"entmax fine-tuning made the held-out MLM probe loss worse: {ft['loss']:.3f} fine-tuned vs "
            f"{nf['loss']:.3f} for the untuned swap (difference {ft['loss'] - nf['loss']:.3f}, se {se:.3f}); "
            f"the gold graphs may not be those of a working entmax model (try more --hf-finetune-steps)")


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


def _log(quiet: bool, msg: str) -> None:
    if not quiet:
        _logger.info(msg)


def stale_settings(trained: EntmaxTrainConfig, asked: EntmaxTrainConfig) -> list[str]:
    """Flags whose value differs between a trained model's config and the one asked for (cadence/device ignored)."""
    a, b = asdict(trained), asdict(asked)
    return [f"--{k.replace('_', '-')} {a.get(k)} vs {b[k]}" for k in b
            if k not in ("checkpoint_every", "device") and a.get(k) != b[k]]


def prepare_small(run: RunDir, train: EntmaxTrainConfig, checkpoint: Optional[str], resume: bool, quiet: bool,
                  tokenizer: str = "minilm"):
    """Load the checkpoint (given, or cached in the run dir when resuming) or train and save one."""
    from .train_entmax import load_small, tokenizer_of, train_and_save

    path = Path(checkpoint) if checkpoint else run.file(CHECKPOINT)
    if checkpoint and not path.exists():
        raise ConfigError(f"--checkpoint {path}: no such file")
    if path.exists() and (checkpoint or resume):
        _log(quiet, f"loading entmax model from {path}")
        model, vmap, tcfg, meta = load_small(path, train.device)
        if not checkpoint:  # a cached model must have been trained with the settings asked for now
            diff = stale_settings(tcfg, train)
            if diff:
                raise ResultsError(f"{path}: the cached model was trained with other settings ({', '.join(diff)}); "
                                   f"use another --out, --no-resume to retrain, or the original settings")
        return model, vmap, tcfg, meta.get("history", {}), str(path)
    _log(quiet, f"training entmax model ({train.objective}, {train.n_layers}x{train.n_heads}, d={train.d_model}, "
                f"N={train.seq_len}, {train.steps} steps on {train.device})")
    # resumable: a partial checkpoint next to ``path`` is continued with ``resume`` and removed when done
    model, vmap, hist = train_and_save(train, path, tokenizer=tokenizer_of(tokenizer), resume=resume, quiet=quiet)
    return model, vmap, train, hist, str(path)


@dataclass
class EntmaxModel:
    """A model with entmax attention ready for the evaluation: its source, per-layer alphas, the fit /
    evaluation / downstream windows, a JSON description, and its downstream task (ids -> task)."""

    source: Any
    alphas: list
    fit_ids: torch.Tensor
    eval_ids: torch.Tensor
    down_ids: torch.Tensor
    info: dict
    task: Callable[..., Any]  # (ids, shard) -> downstream task


#: How to get an entmax model for ``--model``: 'small' trains / loads ours; any other name is an HF model.
ENTMAX_MODELS: Registry[Callable[..., EntmaxModel]] = Registry("entmax model", "--model")


def _entmax_model(name: str) -> Callable[..., EntmaxModel]:
    return ENTMAX_MODELS.get(name if name in ENTMAX_MODELS else "hf")


@ENTMAX_MODELS.register("small", help="our small entmax transformer, trained (or loaded from --checkpoint)")
def _small_model(run, name, train, checkpoint, resume, quiet, tokenizer, n_fit, n_eval, n_down, seed, **_) -> EntmaxModel:
    from ..capture.corpus import token_windows
    from ..sources.small import SmallSource
    from .evaluate import LMTask
    from .train_entmax import tokenizer_of

    tok = tokenizer_of(tokenizer)
    notes: dict = {}

    def windows(cfg: EntmaxTrainConfig):
        held = token_windows(tok, cfg.seq_len, cfg.corpus, max_windows=n_eval + n_down, split="heldout")
        fitw = token_windows(tok, cfg.seq_len, cfg.corpus, max_windows=n_fit, split="fit")
        _check_split(fitw, held, n_fit, n_eval, n_down, notes)
        return held, fitw

    if not checkpoint:  # a too-small corpus fails before minutes of training, not after
        held, fitw = windows(train)
    net, vmap, tcfg, hist, ckpt = prepare_small(run, train, checkpoint, resume, quiet, tokenizer)
    if checkpoint:
        held, fitw = windows(tcfg)
    alphas = [b.attn.alpha() for b in net.blocks]
    alphas = [a.detach().cpu() if isinstance(a, torch.Tensor) else a for a in alphas]
    info = {"kind": "small", "checkpoint": ckpt, "config": net.cfg.to_dict(), "objective": tcfg.objective,
            "train_history": hist,
            "gold_graphs_from": f"our {'causal decoder' if tcfg.objective == 'clm' else 'MLM encoder'} trained with "
                                f"entmax-{tcfg.alpha:g} attention ({tcfg.steps} steps)",
            "setting_id": "small|" + fingerprint({"model": net.cfg.to_dict(), "train": asdict(tcfg)},
                                                 ignore=("checkpoint_every", "device")), **notes}
    return EntmaxModel(SmallSource(net), alphas, vmap(fitw), vmap(held[:n_eval]), vmap(held[n_eval:]), info,
                       lambda ids, shard=None: LMTask(net, ids, tcfg.objective, seed, shard))


@ENTMAX_MODELS.register("hf", help="an HF model (name or folder, e.g. minilm) with softmax swapped for entmax")
def _hf_model(run, name, train, quiet, n_fit, n_eval, n_down, hf_seq_len, hf_finetune_steps, seed, main=True,
              **_) -> EntmaxModel:
    from ..capture.corpus import token_windows
    from ..sources.hf import load_model
    from .evaluate import HiddenTask
    from .finetune_hf import HFFinetuneConfig, entmax_finetuned

    net = load_model(name, device=train.device)
    if hf_seq_len > net.max_len:
        raise ConfigError(f"--hf-seq-len {hf_seq_len} exceeds {name}'s maximum of {net.max_len} positions")
    alpha = train.alpha
    ft = HFFinetuneConfig(steps=hf_finetune_steps, alpha=alpha, seed=seed)
    n_ft = min(8 * hf_finetune_steps, 512) if hf_finetune_steps > 0 else 0
    fitw = token_windows(net.tokenizer, hf_seq_len, train.corpus, split="fit", max_windows=n_fit + n_ft)
    held = token_windows(net.tokenizer, hf_seq_len, train.corpus, max_windows=n_eval + n_down, split="heldout")
    notes: dict = {}
    _check_split(fitw[:n_fit], held, n_fit, n_eval, n_down, notes)
    ft_windows = fitw[n_fit:] if len(fitw) > n_fit else fitw[:n_fit]
    mlm_eval = held[n_eval:][:32] if len(held) > n_eval else held[:32]
    # under torchrun rank 0 fine-tunes (and caches); the others load the cached weights and skip the MLM probes
    rec = entmax_finetuned(net, ft_windows, mlm_eval, ft, probe_windows=fitw[:n_fit][:64], quiet=quiet, probes=main)
    source = (f"{name} with entmax-{alpha:g} attention, fine-tuned {hf_finetune_steps} self-distillation steps"
              + (" (cached weights)" if rec.get("cached") else "")) if hf_finetune_steps > 0 else \
        f"{name} with entmax-{alpha:g} swapped in, NOT fine-tuned (--hf-finetune-steps 0)"
    warnings = ["gold graphs come from a model never trained with entmax (--hf-finetune-steps 0)"] \
        if hf_finetune_steps == 0 else []
    mlm = rec.get("mlm", {})
    worse = finetune_made_worse(mlm)
    if worse:
        warnings.append(worse)
    if "entmax_finetuned" in mlm:
        _log(quiet, "MLM probe loss (held-out): softmax original {:.3f}, entmax swap {:.3f}, entmax fine-tuned "
                    "{:.3f}".format(mlm["softmax_original"]["loss"], mlm["entmax_no_finetune"]["loss"],
                                    mlm["entmax_finetuned"]["loss"]))
    info = {"kind": "hf", **net.describe(), "gold_graphs_from": source, "finetune": rec, "warnings": warnings,
            "setting_id": f"{name}|entmax-{alpha:g}|finetune:{rec['key'] if hf_finetune_steps > 0 else 'none'}"}
    return EntmaxModel(net, [alpha] * net.n_layers, fitw[:n_fit], held[:n_eval], held[n_eval:], info,
                       lambda ids, shard=None: HiddenTask(net, ids, shard=shard))


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
    from ..distributed import (WindowShard, barrier, device_for, gather_lists, init_distributed, require_work_per_rank,
                               shard_indices)
    from .evaluate import capture_layers, downstream, fit_layers, gold_density as gold_density_of, sweep_method
    from .predictors import PREDICTORS, Projector

    def shard_of(ids: torch.Tensor, d) -> torch.Tensor:  # this rank's windows (round-robin)
        return ids[shard_indices(len(ids), d)]

    train = train or EntmaxTrainConfig()
    methods = list(methods or DEFAULT_METHODS)  # --all: every PREDICTORS.names("all")
    for m in methods:
        PREDICTORS.get(m)  # an unknown name is a ConfigError listing the registered ones
    if authors_defaults:
        force_window, force_cls = max(force_window, 1), True
    if loss not in ("sum", "pair"):
        raise ConfigError(f"--loss must be sum or pair (got {loss!r})")
    if min(n_fit, n_eval) < 1 or n_down < 0:
        raise ConfigError("--n-fit and --n-eval must be >= 1, --n-down >= 0")
    run = RunDir(out)
    train_cfg = {k: v for k, v in asdict(train).items() if k != "checkpoint_every"}  # cadence: same results
    config = {"model": model, "checkpoint": checkpoint, "train": train_cfg, "methods": methods, "n_fit": n_fit,
              "n_eval": n_eval, "n_down": n_down, "rank": rank, "epochs": epochs, "targets": list(targets), "seed": seed,
              "hf_seq_len": hf_seq_len, "hf_finetune_steps": hf_finetune_steps, "loss": loss,
              "force_window": force_window, "force_cls": force_cls, "predictor_path": predictor_path,
              "authors_defaults": authors_defaults, "score_rank": score_rank}
    # gloo even with --device cuda: every collective of this workload moves CPU tensors (gradients, float64 sums,
    # pickled samples and metrics); the model itself runs on this rank's device (device_for)
    dist = init_distributed("cpu")
    quiet = quiet or not dist.is_main  # rank 0 logs progress
    prev = run.section(SECTION)
    if resume and prev and prev.get("config") == config and prev.get("complete"):
        _log(quiet, f"{run.path}: section '{SECTION}' already complete with these settings; kept (resume)")
        return prev
    barrier(dist)  # every rank has read the section before rank 0 writes anything
    if dist.is_main:
        run.write_config(SECTION, config)
    seed_everything(seed)
    t_start = time.time()
    info: dict = {"config": config, "complete": False}

    # rank 0 trains / fine-tunes (cached); the others wait, then load the cached model (no second training)
    local_train = replace(train, device=device_for(dist, train.device))
    prep = dict(run=run, name=model, train=local_train, checkpoint=checkpoint, quiet=quiet, tokenizer=tokenizer,
                n_fit=n_fit, n_eval=n_eval, n_down=n_down, hf_seq_len=hf_seq_len, hf_finetune_steps=hf_finetune_steps,
                seed=seed)
    if dist.is_main:
        em = _entmax_model(model)(resume=resume, **prep)
    barrier(dist)
    if not dist.is_main:
        em = _entmax_model(model)(resume=True, main=False, **prep)
    net, alpha, fit_ids, eval_ids, down_ids = em.source, em.alphas, em.fit_ids, em.eval_ids, em.down_ids
    setting_id = em.info.pop("setting_id")
    for w in em.info.pop("warnings", []):
        _warn(info, quiet, w)
    if "downstream_skipped" in em.info:
        info["downstream_skipped"] = em.info.pop("downstream_skipped")
    info["model"] = em.info
    if len(eval_ids) < n_eval:
        _warn(info, quiet, f"only {len(eval_ids)} held-out evaluation windows available (--n-eval {n_eval} asked): "
                           "the corpus is too small")
    if len(eval_ids) < MIN_EVAL:
        _warn(info, quiet, f"{len(eval_ids)} evaluation windows < {MIN_EVAL}: spreads across windows are unreliable")
    if len(fit_ids) < n_fit:
        _warn(info, quiet, f"only {len(fit_ids)} fit windows available (--n-fit {n_fit} asked)")

    require_work_per_rank(len(fit_ids), dist, "--n-fit")
    require_work_per_rank(len(eval_ids), dist, "--n-eval")
    do_down = n_down > 0 and len(down_ids) > 0
    if do_down:
        require_work_per_rank(len(down_ids), dist, "--n-down")
    fit_shard, ev_shard = WindowShard(len(fit_ids), dist), WindowShard(len(eval_ids), dist)
    down_shard = WindowShard(len(down_ids), dist)
    mine = {"rank": dist.rank, "windows": {"fit": fit_shard.n_local, "eval": ev_shard.n_local,
                                           "down": down_shard.n_local if do_down else 0}}
    if dist.enabled:
        _logger.info(f"rank {dist.rank}/{dist.world_size}: {mine['windows']['fit']} fit, {mine['windows']['eval']} eval, "
                     f"{mine['windows']['down']} downstream windows")
    barrier(dist)
    t_work = time.perf_counter()  # the sharded part starts: capture, fit, sweep, downstream
    _log(quiet, f"capturing q/k and gold entmax graphs ({len(fit_ids)} fit, {len(eval_ids)} eval windows"
                f"{f' over {dist.world_size} processes' if dist.enabled else ''})")
    t0 = time.time()
    fit = capture_layers(net, shard_of(fit_ids, dist), alpha=alpha)
    ev = capture_layers(net, shard_of(eval_ids, dist), alpha=alpha)
    info["capture_seconds"] = mine["capture_seconds"] = time.time() - t0
    gold_density = gold_density_of(ev, ev_shard)
    info["gold"] = {"density_per_layer": gold_density, "sparsity": 1.0 - sum(gold_density) / len(gold_density),
                    "seq_len": ev[0].n, "n_layers": len(ev), "n_heads": ev[0].q.shape[1], "d_head": ev[0].q.shape[-1]}
    _log(quiet, f"gold graph sparsity {info['gold']['sparsity']:.3f} (per layer {[round(1 - d, 3) for d in gold_density]})")
    low = gold_below_target(gold_density, TARGET)
    if low:
        _warn(info, quiet, low)

    setting = {"model": setting_id, "seq_len": ev[0].n, "n_layers": len(ev), "n_heads": ev[0].q.shape[1],
               "d_head": ev[0].q.shape[-1], "alpha": [float(a) if not isinstance(a, torch.Tensor) else "learned" for a in alpha]}
    projectors = [Projector(rank, epochs=epochs, seed=seed + l, loss=loss) for l in range(len(fit))]
    results, fitted, fit_seconds = {}, {}, {}
    loaded = {}
    if predictor_path:
        from .predictors.persist import load_predictors

        loaded = load_predictors(predictor_path, methods, setting)
        _log(quiet, f"loaded fitted predictors from {predictor_path}")
    for m in methods:
        t0 = time.time()
        if m in loaded:
            fitted[m] = loaded[m]
            for p in fitted[m]:
                p.force_window, p.force_cls = int(force_window), bool(force_cls)
        else:
            fitted[m] = fit_layers(m, fit, rank=rank, epochs=epochs, seed=seed, projectors=projectors,
                                   force_window=force_window, force_cls=force_cls, shard=fit_shard,
                                   **({"score_rank": score_rank} if m in PREDICTORS.names("trained") else {}))
        fit_seconds[m] = time.time() - t0
        results[m] = sweep_method(m, fitted[m], ev, target=TARGET, shard=ev_shard)
        results[m]["fit_seconds"] = fit_seconds[m]
        r = results[m][f"recall_at_{TARGET:g}"]
        _log(quiet, f"  {m:14s} recall@{TARGET:g} = {'n/a' if r is None else f'{r:.3f}'}  "
                    f"(fit {fit_seconds[m]:.1f}s, sweep {results[m]['seconds']:.1f}s)")
    info["projector_loss"] = [p.history for p in projectors]
    info["methods"] = results
    info["recall_at_0.9"] = {m: results[m][f"recall_at_{TARGET:g}"] for m in methods}
    info["comparison"] = compare_methods(results, TARGET)
    mine["fit_seconds"] = sum(fit_seconds.values())
    mine["sweep_seconds"] = sum(r["seconds"] for r in results.values())
    if not predictor_path and dist.is_main:
        from .predictors.persist import save_predictors

        info["predictors"] = save_predictors(run.file(PREDICTORS_FILE), fitted, setting).name
    info["setting"] = setting

    t0 = time.time()
    if do_down:  # (an empty downstream split was reported by _check_split)
        _log(quiet, f"downstream: attention restricted to predicted graphs ({len(down_ids)} windows)")
        info["downstream"] = downstream(net, em.task(shard_of(down_ids, dist), down_shard), alpha, fitted, results,
                                        targets)
    elif n_down > 0:
        reason = (f"downstream evaluation NOT run: no held-out windows left after the {len(eval_ids)} evaluation "
                  f"windows (--n-down {n_down} asked); use a larger corpus or lower --n-eval")
        _warn(info, quiet, reason)
        info["downstream"] = {"skipped": reason}
    else:
        info["downstream"] = {"skipped": "downstream evaluation not requested (--n-down 0)"}
    info["downstream_seconds"] = mine["downstream_seconds"] = time.time() - t0
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


def _check_split(fitw: torch.Tensor, held: torch.Tensor, n_fit: int, n_eval: int, n_down: int, info: dict) -> None:
    """Warn about fewer windows than asked, refuse too few evaluation windows, report a skipped downstream step."""
    from ..capture.corpus import MIN_EVAL_WINDOWS, check_windows, log

    check_windows(fitw, n_fit, "--n-fit", "fit")
    check_windows(held[:n_eval], n_eval, "--n-eval", "heldout", minimum=MIN_EVAL_WINDOWS)
    down = len(held) - min(n_eval, len(held))
    if n_down > 0 and down == 0:
        info["downstream_skipped"] = (f"no held-out windows left after --n-eval {n_eval} (the split has {len(held)}); "
                                      "lower --n-eval or give more text")
        log.warning("downstream evaluation skipped: %s", info["downstream_skipped"])
    elif n_down > 0:
        check_windows(held[n_eval:], n_down, "--n-down", "heldout")


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


def pareto_table(info: dict) -> list[dict]:
    """Flat rows (method, knob, sparsity, recall, exact, cost, comp_sparsity, front, front_cost) of a finished section.

    ``front``: the point is on the Pareto front of (sparsity, recall) over *all* methods' points (oracle excluded);
    ``front_cost``: on the front of (cost lower, recall higher) over all methods."""
    rows = []
    for m, res in info["methods"].items():
        for p in res["points"]:
            rows.append({"method": m, "knob": f"{res['knob']}={p['knob']}",
                         **{k: p["mean"].get(k, float("nan")) for k in ("sparsity", "recall", "exact", "cost",
                                                                       "comp_sparsity")}})
    cand = [i for i, r in enumerate(rows) if r["method"] != "oracle-topk"]
    front = set(cand[j] for j in pareto_front([(rows[i]["sparsity"], rows[i]["recall"]) for i in cand]))
    front_c = set(cand[j] for j in pareto_front([(-rows[i]["cost"], rows[i]["recall"]) for i in cand]))
    for i, r in enumerate(rows):
        r["front"], r["front_cost"] = i in front, i in front_c
    return rows


def _curve(points: list[tuple[float, float]]):
    """Recall as a function of sparsity along the Pareto front (linear interpolation; None beyond the sparsest)."""
    front = [points[i] for i in pareto_front(points)]

    def f(s: float) -> Optional[float]:
        if not front or s > front[-1][0] + 1e-12:
            return None
        if s <= front[0][0]:
            return front[0][1]
        for (s0, r0), (s1, r1) in zip(front, front[1:]):
            if s0 <= s <= s1:
                return r0 if s1 == s0 else r0 + (s - s0) / (s1 - s0) * (r1 - r0)
        return None

    return f


def compare_methods(results: dict, target: float = TARGET) -> dict:
    """Per layer: does the best learned predictor's front lie above every baseline's front points, and how far
    is it from the oracle at ``target`` sparsity?

    For each layer and baseline point (s, r) with s <= the learned method's sparsest point, the margin is
    learned recall at s (interpolated on its per-layer front) minus r; ``beats_all`` = every margin >= 0."""
    from .predictors import trained_methods

    learned = [m for m in results if m in trained_methods()]
    baselines = [m for m in results if m not in learned and m != "oracle-topk"]
    if not learned:
        return {}
    best = max(learned, key=lambda m: results[m].get(f"recall_at_{target:g}") or -1.0)
    L = len(results[best]["points"][0]["per_layer"]["recall"])
    layers = []
    for l in range(L):
        pts = lambda m: [(p["per_layer"]["sparsity"][l], p["per_layer"]["recall"][l]) for p in results[m]["points"]]  # noqa: E731
        f = _curve(pts(best))
        worst, where, n_cmp = float("inf"), None, 0
        for b in baselines:
            for s, r in (pts(b)[i] for i in pareto_front(pts(b))):
                v = f(s)
                if v is None or s <= 0.0:
                    continue
                n_cmp += 1
                if v - r < worst:
                    worst, where = v - r, {"baseline": b, "sparsity": s, "baseline_recall": r, "learned_recall": v}
        rec = {"layer": l, "min_margin": None if n_cmp == 0 else worst, "worst": where, "n_compared": n_cmp,
               "beats_all": n_cmp > 0 and worst >= 0.0,
               "learned_recall_at_target": results[best][f"recall_at_{target:g}_per_layer"][l]}
        if "oracle-topk" in results:
            o = results["oracle-topk"][f"recall_at_{target:g}_per_layer"][l]
            rec["oracle_recall_at_target"] = o
            lr = rec["learned_recall_at_target"]
            rec["gap_to_oracle"] = None if o is None or lr is None else o - lr
        layers.append(rec)
    return {"best_learned": best, "baselines": baselines, "per_layer": layers,
            "beats_all_layers": all(x["beats_all"] for x in layers)}
