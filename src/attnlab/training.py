"""One training loop for every trainer: AdamW, warm-up/cosine schedule, gradient clipping, and a bit-exact
checkpoint of everything that affects later steps (model, optimiser, scheduler, every RNG, history).

Used by the Sparsefinder entmax trainer (``sparsity/train_entmax.py``), reconstruction training
(``reconstruct/train.py``) and the variable-creation trainer (``variables/train.py``). A run that is
checkpointed after step t and resumed from that file ends bit-identical (CPU) to an uninterrupted run.
"""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from .errors import NumericalError, ResultsError
from .io import read_tensors, write_tensors

CHECKPOINT_KIND = "attnlab entmax partial training"  # the first trainer's file kind, kept for old files


def adamw(model: torch.nn.Module, lr: float, weight_decay: float = 0.01) -> torch.optim.AdamW:
    """AdamW over every parameter of ``model``."""
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)


def warmup_cosine(opt: torch.optim.Optimizer, steps: int, warmup: int = 0,
                  floor: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warmup`` steps, then cosine decay from the base rate to ``floor`` x base at ``steps``."""

    def factor(s: int) -> float:
        cos = floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / max(steps, 1)))
        return cos if warmup <= 0 else min(1.0, (s + 1) / warmup) * cos

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def optimizer_step(loss: torch.Tensor, model: torch.nn.Module, opt: torch.optim.Optimizer,
                   sched: Optional[torch.optim.lr_scheduler.LRScheduler] = None, clip: Optional[float] = None) -> None:
    """Zero the gradients, backpropagate ``loss``, clip the gradient norm to ``clip``, step, advance ``sched``."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if clip is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    opt.step()
    if sched is not None:
        sched.step()


def check_diverged(model: torch.nn.Module, step: int, loss: Any = None, lr: Optional[float] = None) -> None:
    """NumericalError naming --lr when ``loss`` (a number or tensor) or any parameter of ``model`` is NaN/inf:
    a diverged model is never evaluated, saved or cached."""
    lv = None if loss is None else float(loss.detach() if isinstance(loss, torch.Tensor) else loss)
    bad = lv is not None and not math.isfinite(lv)
    if not bad:
        bad = any(not bool(torch.isfinite(p).all()) for p in model.parameters())
        what = "the weights became NaN/inf"
    else:
        what = f"loss {lv}"
    if bad:
        now = "" if lr is None else f" (now {lr:g})"
        raise NumericalError(f"training diverged at step {step} ({what}); lower --lr{now}")


def train_steps(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: int,
                step_loss: Callable[[int], torch.Tensor], *, start: int = 0,
                sched: Optional[torch.optim.lr_scheduler.LRScheduler] = None, clip: Optional[float] = None,
                after_step: Optional[Callable[[int, torch.Tensor], Optional[bool]]] = None) -> int:
    """The loop: for step = start .. steps-1, ``loss = step_loss(step)``, :func:`optimizer_step`, then
    ``after_step(steps_done, loss)`` (logging, evaluation, checkpoints; returning True stops early).
    The model is in training mode throughout; returns the number of steps done."""
    model.train()
    step = start
    lr = opt.param_groups[0].get("initial_lr", opt.param_groups[0]["lr"]) if opt.param_groups else None
    while step < steps:
        loss = step_loss(step)
        if not bool(torch.isfinite(loss.detach()).all()):
            check_diverged(model, step, loss, lr)
        optimizer_step(loss, model, opt, sched, clip)
        step += 1
        if after_step is not None and after_step(step, loss):
            break
    check_diverged(model, step, lr=lr)  # the last update can break the weights after a finite loss
    return step


# ---------------------------------------------------------------------------------------------- checkpoints
def rng_state(g: torch.Generator) -> tuple[dict[str, torch.Tensor], dict]:
    """Every RNG state that affects later steps: data/masking generator, torch global, NumPy, Python (+CUDA)."""
    tensors = {"rng.data": g.get_state(), "rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, st in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = st
    np_state = np.random.get_state()
    tensors["rng.numpy"] = torch.from_numpy(np.asarray(np_state[1], dtype=np.int64))
    py_state = random.getstate()
    meta = {"numpy": [np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])],
            "python": [py_state[0], list(py_state[1]), py_state[2]]}
    return tensors, meta


def restore_rng(g: torch.Generator, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Undo :func:`rng_state`."""
    g.set_state(tensors["rng.data"])
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[f"rng.cuda.{i}"] for i in range(len([k for k in tensors if k.startswith("rng.cuda.")]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    kind, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((kind, tensors["rng.numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))


def save_checkpoint(path: str | Path, fp: str, done: int, model: torch.nn.Module, opt: torch.optim.Optimizer,
                    sched: Any, g: torch.Generator, hist: dict, elapsed: float, kind: str = CHECKPOINT_KIND) -> None:
    """Atomically write everything needed to continue after ``done`` steps (one safetensors file)."""
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    ost = opt.state_dict()
    opt_meta: dict = {"param_groups": ost["param_groups"], "state": {}}
    for pid, st in ost["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"opt.{pid}.{k}"] = v
            else:
                opt_meta["state"].setdefault(str(pid), {})[k] = v
    rng_t, rng_meta = rng_state(g)
    tensors.update(rng_t)
    meta = {"kind": kind, "fingerprint": fp, "step": done, "history": hist, "elapsed": elapsed, "optimizer": opt_meta,
            "scheduler": sched.state_dict() if sched is not None else None, "rng": rng_meta}
    write_tensors(path, tensors, meta)


def load_checkpoint(path: str | Path, fp: str, model: torch.nn.Module, opt: torch.optim.Optimizer, sched: Any,
                    g: torch.Generator, kind: str = CHECKPOINT_KIND) -> tuple[int, dict, float]:
    """Restore a :func:`save_checkpoint` file in place; returns (steps done, history, elapsed seconds).
    A file of another kind or from other settings (``fp``) is refused with a ResultsError."""
    tensors, meta = read_tensors(path)
    if meta.get("kind") != kind:
        raise ResultsError(f"{path}: not an attnlab partial-training checkpoint; delete it or run without --resume")
    if meta.get("fingerprint") != fp:
        raise ResultsError(f"{path}: partial training checkpoint is from other settings (fingerprint "
                           f"{meta.get('fingerprint')} != {fp}); re-run with the original settings, or delete the "
                           f"file / run without --resume to start over")
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    ost = opt.state_dict()
    state: dict = {}
    for k, v in tensors.items():
        if k.startswith("opt."):
            _, pid, name = k.split(".", 2)
            state.setdefault(int(pid), {})[name] = v
    for pid, st in meta["optimizer"]["state"].items():
        state.setdefault(int(pid), {}).update(st)
    groups = meta["optimizer"]["param_groups"]
    for grp, cur in zip(groups, ost["param_groups"]):
        for k, v in cur.items():  # JSON turned tuples (betas) into lists
            if isinstance(v, tuple):
                grp[k] = tuple(grp[k])
    opt.load_state_dict({"state": state, "param_groups": groups})
    if sched is not None:
        sched.load_state_dict(meta["scheduler"])
    restore_rng(g, tensors, meta["rng"])
    back = {None: float("nan"), "inf": float("inf"), "-inf": float("-inf")}  # undo JSON's NaN/inf encoding
    hist = {k: [back.get(v, v) if v is None or isinstance(v, str) else v for v in vals] if isinstance(vals, list) else vals
            for k, vals in meta["history"].items()}
    return int(meta["step"]), hist, float(meta.get("elapsed", 0.0))
