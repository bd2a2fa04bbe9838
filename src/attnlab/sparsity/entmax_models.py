"""Entmax models for a Sparsefinder run: our small entmax transformer (trained or loaded) or an HF model with entmax
swapped in (fine-tuned, cached), each with its fit / evaluation / downstream windows (registry ``ENTMAX_MODELS``)."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from ..config import fingerprint
from ..errors import ConfigError, ResultsError
from ..io import RunDir
from ..registry import Registry
from .train_entmax import EntmaxTrainConfig

CHECKPOINT = "entmax_model.safetensors"
_logger = logging.getLogger("attnlab.sparsity.run")


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


def finetune_made_worse(mlm: dict) -> Optional[str]:
    """A warning when entmax fine-tuning left the held-out MLM probe loss above the untuned entmax swap's."""
    ft, nf = mlm.get("entmax_finetuned"), mlm.get("entmax_no_finetune")
    if not isinstance(ft, dict) or not isinstance(nf, dict) or ft["loss"] <= nf["loss"]:
        return None
    se = (ft.get("loss_se", 0.0) ** 2 + nf.get("loss_se", 0.0) ** 2) ** 0.5
    return (f"entmax fine-tuning made the held-out MLM probe loss worse: {ft['loss']:.3f} fine-tuned vs "
            f"{nf['loss']:.3f} for the untuned swap (difference {ft['loss'] - nf['loss']:.3f}, se {se:.3f}); "
            f"the gold graphs may not be those of a working entmax model (try more --hf-finetune-steps)")


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
    from .finetune_hf import HFFinetuneConfig, check_cache_dir, entmax_finetuned

    if hf_finetune_steps > 0:
        check_cache_dir()
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
