"""Train our small transformer with reconstructed attention (vs full attention) on a char-level LM.

Task: next-byte prediction on Python stdlib docstrings (fit documents for training, held-out documents
for evaluation). In every layer, each head computes its scores exactly only on the selected pairs and
estimates the rest (conditional Gaussian by default); gradients flow through the selected scores and
the (linear) estimator. The statistics the estimator needs drift while the model trains, so they are
refitted from exact-attention forward passes on training batches every ``refresh`` steps (the fitted
statistics are constants for the gradient). Dense scores are computed and only the selected entries
are read: this simulates the approximation's effect on learning; it does not make training faster.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import torch
import torch.nn.functional as F

from ..attention import AttentionCall
from ..errors import ConfigError, CorpusError
from ..validate import check_fields
from ..models.attention import masked_softmax
from ..models.transformer import SmallTransformer, TransformerConfig
from ..seeding import seed_everything
from ..sources.small import SmallSource
from ..training import adamw, train_steps, warmup_cosine
from .evaluate import Combo, Method
from .fit import fit_from_windows


PROXY_KINDS = ("bilinear", "pca", "random")


@dataclass
class TrainConfig:
    """Settings of the reconstruction-training comparison (CLI flags have the same names)."""

    budgets: list = field(default_factory=lambda: [0.125, 0.25, 0.5])  # fractions (or counts) of pairs per row
    estimator: str = "gaussian"  # estimator for the unselected pairs
    selections: list = field(default_factory=lambda: ["adaptive", "random"])  # selection strategies compared
    seq_len: int = 64  # characters per window
    d_model: int = 64  # model width
    n_heads: int = 4  # heads per layer
    n_layers: int = 2  # blocks
    steps: int = 300  # optimiser steps per run
    batch_size: int = 32  # windows per step
    lr: float = 3e-3  # AdamW learning rate (cosine decay to 10%)
    refresh: int = 50  # steps between refits of the estimator statistics
    refit_windows: int = 128  # training windows used for each refit
    proxy: str = "bilinear"  # proxy of the adaptive selection
    proxy_rank: int = 2  # proxy dimension r (d_head = d_model / n_heads)
    eval_windows: int = 128  # held-out windows for the final loss
    max_chars: int = 400_000  # characters of training text read
    log_every: int = 25  # steps between curve points
    seed: int = 0

    def validate(self) -> None:
        """Raise ConfigError on bad values."""
        check_fields(self)
        for n in ("seq_len", "d_model", "n_heads", "n_layers", "steps", "batch_size", "refresh", "refit_windows",
                  "eval_windows", "log_every"):
            if getattr(self, n) < 1:
                raise ConfigError(f"--{n.replace('_', '-')} must be >= 1 (got {getattr(self, n)})")
        if not self.budgets:
            raise ConfigError("--budgets is empty")
        # names and budgets checked before the first (minutes-long) training run, not after it
        from .evaluate import Combo
        from .selection import budget_count

        for b in self.budgets:
            budget_count(b, self.seq_len, flag="--budgets")
        for sel in self.selections:
            Combo(self.estimator, sel).validate()
        if self.proxy not in PROXY_KINDS:
            raise ConfigError(f"--proxy must be one of {', '.join(PROXY_KINDS)} (got {self.proxy!r})")


def char_windows(seq_len: int, split: str, max_chars: int) -> torch.Tensor:
    """Byte-level windows (M, seq_len) of stdlib docstrings from one split ('fit' or 'heldout')."""
    from ..capture.corpus import is_heldout, stdlib_docstrings

    buf = bytearray()
    for doc in stdlib_docstrings():
        if is_heldout(doc, 0.2) != (split == "heldout"):
            continue
        buf.extend(doc.encode("utf-8", "replace") + b"\n\n")
        if len(buf) >= max_chars:
            break
    m = len(buf) // seq_len
    if m < 2:
        raise CorpusError(f"only {len(buf)} characters in split {split!r}; lower --seq-len")
    return torch.frombuffer(bytearray(buf[: m * seq_len]), dtype=torch.uint8).long().view(m, seq_len)


class ReconstructedAttention:
    """Attention handler that applies one reconstruction method to every head (softmax of the estimates)."""

    def __init__(self, method: Optional[Method] = None):
        self.method = method

    def __call__(self, call: AttentionCall) -> torch.Tensor:
        scores = call.scores()  # (B, H, N, N), -inf where masked
        est = torch.stack([self.method.reconstruct(call, h, scores[:, h]) for h in range(call.n_heads)], 1)
        return masked_softmax(est, call.valid) @ call.value


def _loss(model: SmallTransformer, ids: torch.Tensor) -> torch.Tensor:
    logits = model(ids).logits  # (B, N, V)
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def _refit(model: SmallTransformer, windows: torch.Tensor, combo: Combo, budget, cfg: TrainConfig) -> Method:
    resid = [(cfg.proxy, cfg.proxy_rank, cfg.seed)] if combo.estimator == "proxy+gaussian" else []
    fit = fit_from_windows(model, windows, batch_size=64, model_name="small-transformer", residual_proxies=resid)
    m = Method(fit, combo, 0, proxy=cfg.proxy, proxy_rank=cfg.proxy_rank, seed=cfg.seed, dtype=torch.float32)
    from .selection import budget_count

    m.b = budget_count(budget, cfg.seq_len)
    return m


@torch.no_grad()
def heldout_loss(model: SmallTransformer, windows: torch.Tensor, batch_size: int = 64) -> float:
    """Mean next-byte cross-entropy (nats) on ``windows``."""
    model.eval()
    tot, n = 0.0, 0
    for ids in windows.split(batch_size):
        tot += float(_loss(model, ids)) * ids.shape[0]
        n += ids.shape[0]
    model.train()
    return tot / max(n, 1)


def train_one(cfg: TrainConfig, train: torch.Tensor, heldout: torch.Tensor, combo: Optional[Combo],
              budget=None) -> dict[str, Any]:
    """Train one model (full attention when ``combo`` is None); returns its curve and final losses."""
    g = seed_everything(cfg.seed)
    tcfg = TransformerConfig(vocab_size=256, d_model=cfg.d_model, n_heads=cfg.n_heads, n_layers=cfg.n_layers,
                             max_len=cfg.seq_len, causal=True)
    model = SmallTransformer(tcfg)
    opt = adamw(model, cfg.lr, weight_decay=0.01)
    sched = warmup_cosine(opt, cfg.steps, floor=0.1)
    curve, t0 = [], time.perf_counter()
    attention = ReconstructedAttention()
    smooth: list = []

    def step_loss(step: int) -> torch.Tensor:
        if combo is not None and step % cfg.refresh == 0:
            pick = torch.randint(len(train), (min(cfg.refit_windows, len(train)),), generator=g)
            attention.method = _refit(model, train[pick], combo, budget, cfg)
        return _loss(model, train[torch.randint(len(train), (cfg.batch_size,), generator=g)])

    def after_step(done: int, loss: torch.Tensor) -> None:
        lv = float(loss.detach())
        smooth[:] = [lv if not smooth else 0.9 * smooth[0] + 0.1 * lv]
        if done % cfg.log_every == 0 or done == cfg.steps:
            curve.append({"step": done, "train_loss": smooth[0]})

    # reconstructed attention while training (the refit inside nests its own exact-attention hooks)
    with SmallSource(model).hooks(attention) if combo is not None else contextlib.nullcontext():
        train_steps(model, opt, cfg.steps, step_loss, sched=sched, clip=1.0, after_step=after_step)
        method = attention.method
        res: dict[str, Any] = {"label": "full" if combo is None else combo.label, "budget": budget,
                               "budget_pairs": None if method is None else method.b, "curve": curve}
        res["heldout_loss"] = heldout_loss(model, heldout)  # with the attention it was trained with
    res["heldout_loss_exact_attention"] = heldout_loss(model, heldout)
    res["seconds"] = round(time.perf_counter() - t0, 2)
    return res


def train_compare(cfg: Optional[TrainConfig] = None, progress: bool = True, **kw: Any) -> dict[str, Any]:
    """Full attention vs reconstructed attention at every budget and selection; returns the results section."""
    cfg = cfg or TrainConfig(**kw)
    cfg.validate()
    torch.manual_seed(cfg.seed)
    train = char_windows(cfg.seq_len, "fit", cfg.max_chars)
    heldout = char_windows(cfg.seq_len, "heldout", cfg.max_chars // 4)
    g = torch.Generator().manual_seed(cfg.seed)
    heldout = heldout[torch.randperm(len(heldout), generator=g)[: cfg.eval_windows]]
    runs = [train_one(cfg, train, heldout, None)]
    if progress:
        print(f"full attention: held-out loss {runs[0]['heldout_loss']:.4f} ({runs[0]['seconds']} s)", flush=True)
    for sel in cfg.selections:
        for b in cfg.budgets:
            combo = Combo(cfg.estimator, sel)
            combo.validate()
            r = train_one(cfg, train, heldout, combo, b)
            runs.append(r)
            if progress:
                print(f"{combo.label} budget {b}: held-out loss {r['heldout_loss']:.4f} ({r['seconds']} s)", flush=True)
    return {"config": asdict(cfg), "runs": runs, "task": "char-level causal LM on stdlib docstrings (bytes)",
            "n_train_windows": int(len(train)), "n_heldout_windows": int(len(heldout))}
