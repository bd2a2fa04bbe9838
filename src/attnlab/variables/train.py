"""Bounded-norm training of a readout-token transformer on a sparse Boolean task.

Norm control acts on the quantities of the Edelman et al. bound: per head ||W_Q^h^T W_K^h||_F (the
bilinear form behind the attention scores, before the 1/sqrt(d_head) scale), ||W_V||_F per layer and
||W_out||_F of the classifier. ``mode="constrain"`` rescales them onto their bounds after every step
(projection); ``mode="penalty"`` adds ``penalty * (sum of those norms)`` to the loss. Weight decay
(AdamW, decoupled) is independent of the mode. Biases are not constrained.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import torch
import torch.nn.functional as F

from ..errors import ConfigError, NumericalError
from ..validate import check_fields
from ..seeding import seed_everything
from ..training import adamw, train_steps
from .tasks import Split, SparseBooleanTask

NORM_MODES = ("none", "constrain", "penalty")
MONITORS = ("val", "test", "train")


@dataclass
class NormControl:
    """How the W_Q W_K^T, W_V and output-layer norms are controlled (bounds None = unconstrained)."""

    mode: str = "none"  # none | constrain (project after each step) | penalty (add to the loss)
    qk_bound: Optional[float] = None  # bound on ||W_Q^h^T W_K^h||_F per head (constrain)
    v_bound: Optional[float] = None  # bound on ||W_V||_F per layer (constrain)
    out_bound: Optional[float] = None  # bound on ||W_out||_F of the classifier (constrain)
    penalty: float = 0.0  # coefficient of the summed norms (penalty)

    def __post_init__(self) -> None:
        if self.mode not in NORM_MODES:
            raise ConfigError(f"--norm-mode must be one of {', '.join(NORM_MODES)} (got {self.mode!r})")
        for flag, b in (("--qk-bound", self.qk_bound), ("--v-bound", self.v_bound), ("--out-bound", self.out_bound)):
            if b is not None and not b > 0:
                raise ConfigError(f"{flag} must be > 0 (got {b})")
        if self.penalty < 0:
            raise ConfigError(f"--penalty must be >= 0 (got {self.penalty})")
        if self.mode == "constrain" and all(b is None for b in (self.qk_bound, self.v_bound, self.out_bound)):
            raise ConfigError("--norm-mode constrain needs at least one of --qk-bound, --v-bound, --out-bound")
        if self.mode == "penalty" and self.penalty == 0:
            raise ConfigError("--norm-mode penalty needs --penalty > 0")


@dataclass
class TrainConfig:
    """Model and optimiser settings for one training run."""

    d_model: int = 64  # hidden width
    n_heads: int = 2  # attention heads
    n_layers: int = 1  # transformer blocks
    d_ff: int = 0  # MLP width (0 = 4 * d_model)
    mlp: bool = True  # MLP sub-block
    layer_norm: bool = True  # pre-LN blocks
    attention: str = "softmax"  # softmax | entmax | sparsemax
    alpha: float = 1.5  # entmax alpha
    lr: float = 1e-3  # Adam learning rate
    batch_size: int = 64  # minibatch size (capped at the train size)
    max_steps: int = 2000  # optimiser steps at most
    weight_decay: float = 0.01  # AdamW decoupled weight decay
    eval_every: int = 50  # steps between evaluations
    patience: int = 8  # evaluations without improvement before stopping
    stop_acc: float = 1.0  # stop as soon as the monitored accuracy reaches this
    monitor: str = "val"  # early stopping on: val (fresh held-out set) | test | train
    n_test: int = 1000  # test-set size
    n_val: int = 1000  # validation-set size (monitor = val)
    norm: NormControl = field(default_factory=NormControl)

    def __post_init__(self) -> None:
        if isinstance(self.norm, dict):
            self.norm = NormControl(**self.norm)
        check_fields(self, skip=("device", "norm"))
        for flag, v in (("--lr", self.lr), ("--batch-size", self.batch_size), ("--max-steps", self.max_steps),
                        ("--eval-every", self.eval_every), ("--patience", self.patience), ("--n-test", self.n_test)):
            if not v > 0:
                raise ConfigError(f"{flag} must be > 0 (got {v})")
        if self.weight_decay < 0:
            raise ConfigError(f"--weight-decay must be >= 0 (got {self.weight_decay})")
        if self.monitor not in MONITORS:
            raise ConfigError(f"--monitor must be one of {', '.join(MONITORS)} (got {self.monitor!r})")
        if self.monitor == "val" and self.n_val <= 0:
            raise ConfigError(f"--n-val must be > 0 with --monitor val (got {self.n_val})")
        if not 0 < self.stop_acc <= 1:
            raise ConfigError(f"--stop-acc must be in (0, 1] (got {self.stop_acc})")

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (for JSON)."""
        return asdict(self)


@dataclass
class TrainResult:
    """Outcome of :func:`train_model` (``model`` holds the best-monitored weights)."""

    test_acc: float
    train_acc: float
    val_acc: Optional[float]
    steps: int
    best_step: int
    seconds: float
    norms: dict[str, Any]
    history: list[dict[str, Any]]
    model: Any = field(repr=False, default=None)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary (without the model)."""
        d = asdict(self)
        d.pop("model")
        return d


def resolve_device(device: str) -> torch.device:
    """'cpu' | 'cuda' | 'cuda:N' | 'auto' -> torch.device, with a clear error if CUDA is missing."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: CUDA is not available on this machine (use --device cpu)")
    if not (device == "cpu" or device.startswith("cuda")):
        raise ConfigError(f"--device must be cpu, cuda[:N] or auto (got {device!r})")
    return torch.device(device)


def build_model(task: SparseBooleanTask, cfg: TrainConfig):
    """A SmallTransformer encoder with a 2-class readout on token 0 and no token head."""
    from ..models.transformer import SmallTransformer, TransformerConfig

    tcfg = TransformerConfig(
        vocab_size=task.vocab_size, d_model=cfg.d_model, n_heads=cfg.n_heads, n_layers=cfg.n_layers, d_ff=cfg.d_ff,
        max_len=task.seq_len, causal=False, attention=cfg.attention, alpha=cfg.alpha, n_classes=2, lm_head=False,
        layer_norm=cfg.layer_norm, mlp=cfg.mlp,
    )
    return SmallTransformer(tcfg)


def _qk_matrices(model) -> list[torch.Tensor]:
    """Per layer, the (H, d, d) stack of W_Q^h^T W_K^h."""
    out = []
    for block in model.blocks:
        attn = block.attn
        d, H, dh = attn.cfg.d_model, attn.n_heads, attn.d_head
        w = attn.qkv.weight
        wq, wk = w[:d].view(H, dh, d), w[d:2 * d].view(H, dh, d)
        out.append(wq.transpose(1, 2) @ wk)
    return out


def _v_weights(model) -> list[torch.Tensor]:
    """Per layer, W_V (d, d)."""
    return [b.attn.qkv.weight[2 * b.attn.cfg.d_model:] for b in model.blocks]


def model_norms(model) -> dict[str, Any]:
    """Frobenius norms: qk [layer][head] of W_Q^h^T W_K^h, v [layer] of W_V, out of the classifier."""
    with torch.no_grad():
        qk = [m.flatten(1).norm(dim=1).tolist() for m in _qk_matrices(model)]
        v = [float(w.norm()) for w in _v_weights(model)]
        out = float(model.classifier.weight.norm())
    return {"qk": qk, "v": v, "out": out, "qk_max": max(max(r) for r in qk)}


def norm_penalty(model) -> torch.Tensor:
    """Sum of the controlled norms (differentiable)."""
    total = sum(m.flatten(1).norm(dim=1).sum() for m in _qk_matrices(model))
    total = total + sum(w.norm() for w in _v_weights(model))
    return total + model.classifier.weight.norm()


@torch.no_grad()
def project_norms(model, norm: NormControl) -> None:
    """Rescale weights so every controlled norm is within its bound (no-op for unset bounds)."""
    for block, qk in zip(model.blocks, _qk_matrices(model)):
        attn = block.attn
        d, H, dh = attn.cfg.d_model, attn.n_heads, attn.d_head
        w = attn.qkv.weight
        if norm.qk_bound is not None:
            scale = (norm.qk_bound / qk.flatten(1).norm(dim=1).clamp_min(1e-12)).clamp(max=1.0).sqrt()  # (H,)
            w[:d].view(H, dh, d).mul_(scale.view(H, 1, 1))
            w[d:2 * d].view(H, dh, d).mul_(scale.view(H, 1, 1))
        if norm.v_bound is not None:
            wv = w[2 * d:]
            wv.mul_(min(1.0, norm.v_bound / max(float(wv.norm()), 1e-12)))
    if norm.out_bound is not None:
        wo = model.classifier.weight
        wo.mul_(min(1.0, norm.out_bound / max(float(wo.norm()), 1e-12)))


@torch.no_grad()
def accuracy(model, x: torch.Tensor, y: torch.Tensor, chunk: int = 1024) -> float:
    """Classification accuracy of the readout on (x, y), evaluated in chunks."""
    if len(x) == 0:
        return float("nan")
    was = model.training
    model.eval()
    correct = 0
    for i in range(0, len(x), chunk):
        logits = model(x[i:i + chunk]).class_logits
        correct += int((logits.argmax(-1) == y[i:i + chunk]).sum())
    model.train(was)
    return correct / len(x)


def train_model(
    task: SparseBooleanTask, m: int, cfg: Optional[TrainConfig] = None, device: str = "cpu",
    seed: Optional[int] = None, split: Optional[Split] = None,
) -> TrainResult:
    """Train on ``m`` examples of ``task`` with Adam(W) and early stopping; return accuracies and norms.

    ``seed`` (default: the task's seed) fixes the initialisation and batch order.
    """
    cfg = cfg or TrainConfig()
    if m <= 0:
        raise ConfigError(f"--m (train size) must be > 0 (got {m})")
    dev = resolve_device(device)
    seed = task.seed if seed is None else seed
    split = split or task.split(m, cfg.n_test, cfg.n_val if cfg.monitor == "val" else 0)
    gen = seed_everything(seed)
    model = build_model(task, cfg).to(dev)
    opt = adamw(model, cfg.lr, cfg.weight_decay)
    tx, ty = split.train_x.to(dev), split.train_y.to(dev)
    sx, sy = split.test_x.to(dev), split.test_y.to(dev)
    vx = split.val_x.to(dev) if split.val_x is not None else None
    vy = split.val_y.to(dev) if split.val_y is not None else None
    n = len(tx)
    bs = min(cfg.batch_size, n)
    sub = torch.randperm(n, generator=gen)[:2048].to(dev)  # train accuracy on at most 2048 examples
    mon_x, mon_y = {"val": (vx, vy), "test": (sx, sy), "train": (tx[sub], ty[sub])}[cfg.monitor]

    t0 = time.perf_counter()
    history: list[dict[str, Any]] = []
    best_acc, best_step, best_state, stale = -1.0, 0, None, 0
    batches = {"perm": torch.randperm(n, generator=gen), "pos": 0}
    sums = {"loss": 0.0, "n": 0, "last": None}

    def step_loss(step: int) -> torch.Tensor:
        if batches["pos"] + bs > n:
            batches["perm"], batches["pos"] = torch.randperm(n, generator=gen), 0
        idx = batches["perm"][batches["pos"]:batches["pos"] + bs].to(dev)
        batches["pos"] += bs
        loss = F.cross_entropy(model(tx[idx]).class_logits, ty[idx])
        sums["last"] = loss
        return loss + cfg.norm.penalty * norm_penalty(model) if cfg.norm.mode == "penalty" else loss

    def after_step(step: int, total: torch.Tensor) -> bool:
        nonlocal best_acc, best_step, best_state, stale
        if cfg.norm.mode == "constrain":
            project_norms(model, cfg.norm)
        sums["loss"], sums["n"] = sums["loss"] + float(sums["last"].detach()), sums["n"] + 1
        if step % cfg.eval_every == 0 or step == cfg.max_steps:
            acc = accuracy(model, mon_x, mon_y)
            norms = model_norms(model)
            history.append({"step": step, "loss": sums["loss"] / sums["n"], f"{cfg.monitor}_acc": acc,
                            "qk_max": norms["qk_max"], "v": norms["v"], "out": norms["out"]})
            sums["loss"], sums["n"] = 0.0, 0
            if acc > best_acc:
                best_acc, best_step, stale = acc, step, 0
                best_state = copy.deepcopy(model.state_dict())
            else:
                stale += 1
            if acc >= cfg.stop_acc or stale >= cfg.patience or not math.isfinite(history[-1]["loss"]):
                return True
        return False

    step = train_steps(model, opt, cfg.max_steps, step_loss, after_step=after_step)
    if history and not math.isfinite(history[-1]["loss"]):
        raise NumericalError(f"training diverged: loss {history[-1]['loss']} at step {step} (T={task.T}, m={m}); "
                             f"lower --lr (now {cfg.lr:g})")
    if best_state is not None:
        model.load_state_dict(best_state)
    return TrainResult(
        test_acc=accuracy(model, sx, sy), train_acc=accuracy(model, tx[sub], ty[sub]),
        val_acc=accuracy(model, vx, vy) if vx is not None else None, steps=step, best_step=best_step,
        seconds=time.perf_counter() - t0, norms=model_norms(model), history=history, model=model,
    )
