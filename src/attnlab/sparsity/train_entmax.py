"""Train our small entmax-attention transformer for Sparsefinder (masked LM encoder or causal LM decoder) on a
text corpus, resumably; save and load it.

Split by concern: the compact vocabulary and MLM masking live in ``vocab.py``, the HF entmax swap and
distillation in ``entmax_hf.py`` (both re-exported here), the loop and checkpoints in ``attnlab.training``.
"""

from __future__ import annotations

import logging
import hashlib
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from ..config import fingerprint
from ..errors import ConfigError, NumericalError, ResultsError
from ..io import checkpoint_written, read_tensors, write_tensors
from ..models.attention import check_alpha
from ..validate import check_fields
from ..models.transformer import SmallTransformer, TransformerConfig
from ..seeding import seed_everything
from ..training import adamw, load_checkpoint, save_checkpoint, train_steps
from .entmax_hf import entmax_handler, finetune_hf_entmax, hf_hidden  # noqa: F401  (re-exported)
from .vocab import CLS, MASK, N_SPECIAL, PAD, SEP, UNK, VocabMap, lm_loss, mlm_batch, tokenizer_of  # noqa: F401

_log = logging.getLogger(__name__)



@dataclass
class EntmaxTrainConfig:
    """Hyper-parameters of small entmax-model training (one comment per field)."""

    objective: str = "mlm"  # mlm (bidirectional encoder) | clm (causal decoder)
    seq_len: int = 64  # tokens per window (incl. [CLS]/[SEP])
    vocab_size: int = 4096  # mapped vocabulary (most frequent MiniLM ids + 5 specials)
    d_model: int = 128  # width
    n_heads: int = 4  # heads per layer
    n_layers: int = 2  # layers
    alpha: float = 1.5  # entmax alpha (> 1)
    learn_alpha: bool = False  # learn one alpha per head
    steps: int = 600  # optimiser steps
    batch_size: int = 32  # windows per step
    lr: float = 1e-3  # AdamW learning rate (cosine decay, 5% warm-up)
    weight_decay: float = 0.01  # AdamW weight decay
    mask_prob: float = 0.15  # MLM: fraction of tokens masked (80/10/10 [MASK]/random/keep)
    max_windows: int = 4000  # fit windows read from the corpus
    corpus: Optional[str] = None  # text source (None = stdlib docstrings)
    device: str = "cpu"  # torch device
    seed: int = 0  # seed for data order, masking and init
    checkpoint_every: int = 100  # steps between resumable partial checkpoints (0 = none); does not change results

    def __post_init__(self) -> None:
        check_fields(self)
        if self.objective not in ("mlm", "clm"):
            raise ConfigError(f"--objective must be mlm or clm (got {self.objective!r})")
        check_alpha(self.alpha)
        if self.vocab_size <= N_SPECIAL + 1:
            raise ConfigError(f"--vocab-size must be > {N_SPECIAL + 1} (got {self.vocab_size})")
        if self.steps < 0 or self.batch_size < 1 or not 0 < self.mask_prob < 1:
            raise ConfigError("--steps >= 0, --batch-size >= 1 and 0 < --mask-prob < 1 required")
        if self.checkpoint_every < 0:
            raise ConfigError(f"--checkpoint-every must be >= 0 (got {self.checkpoint_every})")


def load_corpus_windows(cfg: EntmaxTrainConfig, tokenizer, split: str, max_windows: int) -> torch.Tensor:
    """Token windows (original ids) of the corpus."""
    from ..capture.corpus import token_windows

    return token_windows(tokenizer, cfg.seq_len, cfg.corpus, max_windows=max_windows, split=split)


def partial_path(out: str | Path) -> Path:
    """The resumable partial-training checkpoint that goes with the final model file ``out``."""
    out = Path(out)
    suffix = out.suffix or ".safetensors"
    return out.with_name(f"{out.stem if out.suffix else out.name}.partial{suffix}")


def train_fingerprint(cfg: EntmaxTrainConfig, windows: torch.Tensor, log_every: int) -> str:
    """Hash of everything that changes the trained numbers (config minus checkpoint_every, data, log cadence)."""
    data = hashlib.sha256(windows.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]
    return fingerprint({**asdict(cfg), "windows": [list(windows.shape), data], "log_every": log_every},
                       ignore=("checkpoint_every",))


def entmax_schedule(opt: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """5% linear warm-up, then cosine decay to 0, as first shipped (the cosine in float32 with pi ~ 3.14159; kept
    instead of :func:`attnlab.training.warmup_cosine` so that trained models and checkpoints stay bit-identical)."""
    warm = max(1, steps // 20)
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + torch.cos(torch.tensor(min(s, steps) / max(steps, 1) * 3.14159)).item()))


def _entmax_transformer(cfg: EntmaxTrainConfig, vocab_size: int) -> SmallTransformer:
    """The untrained small entmax transformer of ``cfg`` (causal for the clm objective), on ``cfg.device``."""
    mcfg = TransformerConfig(vocab_size=vocab_size, d_model=cfg.d_model, n_heads=cfg.n_heads, n_layers=cfg.n_layers,
                             max_len=cfg.seq_len, causal=cfg.objective == "clm", attention="entmax", alpha=cfg.alpha,
                             learn_alpha=cfg.learn_alpha)
    return SmallTransformer(mcfg).to(cfg.device)


def train_small(cfg: EntmaxTrainConfig, windows: Optional[torch.Tensor] = None, tokenizer=None,
                log_every: int = 50, quiet: bool = False, checkpoint: Optional[str | Path] = None,
                resume: bool = False, on_step: Optional[Callable[[int], None]] = None,
                ) -> tuple[SmallTransformer, VocabMap, dict]:
    """Train a small entmax transformer; returns (model, vocab map, history dict).

    ``checkpoint``: partial-checkpoint file, written atomically every ``cfg.checkpoint_every`` steps with the
    model, AdamW and LR-scheduler state, loss history and all RNG states. With ``resume`` and that file present,
    training continues from it and ends bit-identical (CPU) to an uninterrupted run; a checkpoint from other
    settings is refused (``ResultsError``). The caller removes it once the final model is saved
    (:func:`train_and_save` does). ``on_step(steps_done)`` is called after every step (and its checkpoint).
    """
    g = seed_everything(cfg.seed)
    tokenizer = tokenizer or tokenizer_of()
    if windows is None:
        windows = load_corpus_windows(cfg, tokenizer, "fit", cfg.max_windows)
    vmap = VocabMap.from_windows(windows, cfg.vocab_size, tokenizer)
    data = vmap(windows)
    model = _entmax_transformer(cfg, vmap.size)
    opt = adamw(model, cfg.lr, cfg.weight_decay)
    sched = entmax_schedule(opt, cfg.steps)
    hist: dict = {"step": [], "loss": [], "acc": []}
    ckpt = Path(checkpoint) if checkpoint is not None else None
    fp = train_fingerprint(cfg, windows, log_every) if ckpt is not None else ""
    start, elapsed = 0, 0.0
    if ckpt is not None and resume and ckpt.exists():
        start, hist, elapsed = load_checkpoint(ckpt, fp, model, opt, sched, g)
        if not quiet:
            _log.info(f"  resuming training from {ckpt} at step {start}/{cfg.steps}")
    t0 = time.time() - elapsed
    accs: list = []

    def step_loss(step: int) -> torch.Tensor:
        idx = torch.randint(len(data), (cfg.batch_size,), generator=g)
        loss, acc = lm_loss(model, data[idx], cfg.objective, g, cfg.mask_prob)
        accs[:] = [acc]
        return loss

    def after_step(done: int, loss: torch.Tensor) -> None:
        step = done - 1
        if step % log_every == 0 or step == cfg.steps - 1:
            hist["step"].append(step)
            hist["loss"].append(float(loss.detach()))
            hist["acc"].append(float(accs[0]))
            if not math.isfinite(hist["loss"][-1]):  # checked at log steps (incl. the last): no NaN model is saved
                raise NumericalError(f"training diverged: loss {hist['loss'][-1]} at step {step}; lower --lr "
                                     f"(now {cfg.lr:g})")
            if not quiet:
                _log.info(f"  step {step:5d}  loss {hist['loss'][-1]:.3f}  acc {float(accs[0]):.3f}  ({time.time() - t0:.0f}s)")
        if ckpt is not None and cfg.checkpoint_every > 0 and done % cfg.checkpoint_every == 0 and done < cfg.steps:
            save_checkpoint(ckpt, fp, done, model, opt, sched, g, hist, time.time() - t0)
            checkpoint_written()
        if on_step is not None:
            on_step(done)

    train_steps(model, opt, cfg.steps, step_loss, start=start, sched=sched, clip=1.0, after_step=after_step)
    model.eval()
    hist["seconds"] = time.time() - t0
    return model, vmap, hist


def train_and_save(cfg: EntmaxTrainConfig, out: str | Path, tokenizer=None, windows: Optional[torch.Tensor] = None,
                   resume: bool = False, quiet: bool = False, log_every: int = 50,
                   on_step: Optional[Callable[[int], None]] = None) -> tuple[SmallTransformer, VocabMap, dict]:
    """Train (resumably, via :func:`partial_path`) and save the final model to ``out``; the partial checkpoint
    is removed once the final model is written."""
    part = partial_path(out)
    model, vmap, hist = train_small(cfg, windows, tokenizer, log_every=log_every, quiet=quiet, checkpoint=part,
                                    resume=resume, on_step=on_step)
    save_small(out, model, vmap, cfg, hist)
    part.unlink(missing_ok=True)
    return model, vmap, hist


def save_small(path: str | Path, model: SmallTransformer, vmap: VocabMap, cfg: EntmaxTrainConfig, history: dict) -> Path:
    """Save model weights, vocabulary map and configs as one safetensors file."""
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    tensors["vocab.keep"] = vmap.keep
    meta = {"model_config": model.cfg.to_dict(), "train_config": asdict(cfg), "specials": vmap.specials,
            "full_vocab": len(vmap.table), "history": history}
    return write_tensors(path, tensors, meta)


def load_small(path: str | Path, device: str = "cpu") -> tuple[SmallTransformer, VocabMap, EntmaxTrainConfig, dict]:
    """Load what :func:`save_small` wrote: (model, vocab map, train config, metadata)."""
    tensors, meta = read_tensors(path)
    if "model_config" not in meta:
        raise ResultsError(f"{path}: not an attnlab entmax checkpoint (no model_config in metadata)")
    try:
        model = SmallTransformer(TransformerConfig(**meta["model_config"]))
        model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        model.to(device).eval()
        vmap = VocabMap(tensors["vocab.keep"], meta["specials"], meta["full_vocab"])
        cfg = EntmaxTrainConfig(**meta["train_config"])
    except (RuntimeError, KeyError, TypeError, ValueError) as e:
        if isinstance(e, ConfigError):
            raise ResultsError(f"{path}: checkpoint holds invalid settings ({e})") from e
        raise ResultsError(f"{path}: broken entmax checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                           "retrain it") from e
    return model, vmap, cfg, meta
