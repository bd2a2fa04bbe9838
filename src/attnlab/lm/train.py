"""Train the reference byte-level Llama (RoPE, grouped-query attention) on the stdlib source; save an HF folder."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from ..errors import ConfigError, ResultsError
from ..io import checkpoint_written, public_writes, write_json
from ..training import check_diverged, load_checkpoint, save_checkpoint
from .data import EOS_ID, VOCAB, load_corpus, windows

META = "attnlab_lm.json"
PARTIAL = "attnlab_lm.partial.safetensors"  # the resumable checkpoint inside --out (removed once the model is saved)
PARTIAL_KIND = "attnlab lm partial training"


@dataclass(frozen=True)
class LMConfig:
    """Model size, context, optimisation and data settings (the cache key: all but ``device`` and ``eval_every``;
    ``eval_every`` steps the held-out loss is logged on 2 windows, the overfitting curve)."""

    seq_len: int = 16384
    long_seq_len: int = 65536
    long_frac: float = 0.25
    d_model: int = 512
    n_layers: int = 6
    n_heads: int = 8
    n_kv_heads: int = 2
    d_ff: int = 1536
    head_dim: Optional[int] = None
    rope_theta: float = 500_000.0
    max_positions: int = 131072
    batch_size: int = 8
    lr: float = 2e-3
    weight_decay: float = 0.1
    warmup_steps: int = 30
    steps: int = 2000
    max_seconds: float = 240.0
    eval_windows: int = 8
    eval_every: int = 100
    heldout_frac: float = 0.05
    max_bytes: Optional[int] = None
    corpus: Optional[str] = None
    seed: int = 0
    device: str = "auto"

    def __post_init__(self) -> None:
        for name in ("seq_len", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "batch_size", "steps",
                     "eval_windows"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.head_dim is None and self.d_model % self.n_heads:
            raise ConfigError(f"--d-model {self.d_model} must be a multiple of --n-heads {self.n_heads} "
                              "(or give --head-dim)")
        if self.head_dim is not None and (self.head_dim < 2 or self.head_dim % 2):
            raise ConfigError(f"--head-dim must be an even number >= 2 (RoPE rotates pairs), got {self.head_dim}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"--n-heads {self.n_heads} must be a multiple of --n-kv-heads {self.n_kv_heads}")
        if max(self.seq_len, self.long_seq_len) > self.max_positions:
            raise ConfigError(f"--seq-len/--long-seq-len exceed --max-positions {self.max_positions}")
        if not 0.0 <= self.long_frac < 1.0:
            raise ConfigError(f"--long-frac must be in [0, 1), got {self.long_frac}")
        if not self.lr > 0:
            raise ConfigError(f"--lr must be > 0, got {self.lr}")

    def key(self) -> str:
        """Fingerprint of everything that changes the trained weights (not the device)."""
        d = asdict(self)
        for k in ("device", "eval_every"):  # neither changes the weights
            d.pop(k)
        if d["head_dim"] is None:  # keys of models trained before the field existed stay valid
            d.pop("head_dim")
        return hashlib.sha1(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


#: Named configurations: 'gpu' = the reference model (one GPU, <= 5 min); 'tiny' = seconds on CPU (tests);
#: 'gpu-8b-attn' = an 8B model's attention geometry (Llama-3-8B: 32 query heads, 8 KV heads, head dim 128) in 8
#: layers of width 1024 (154M parameters; ~89k tok/s at 16k on an H200), so per-layer attention time at N equals
#: an 8B model's; 'tiny-8b-attn' = its CPU twin with the same 4:1 grouping (tests).
PRESETS: dict[str, LMConfig] = {
    "gpu": LMConfig(),
    "gpu-8b-attn": LMConfig(d_model=1024, n_layers=8, n_heads=32, n_kv_heads=8, head_dim=128, d_ff=2816,
                            batch_size=2, lr=1.5e-3, max_seconds=200.0),
    "tiny-8b-attn": LMConfig(seq_len=128, long_seq_len=256, d_model=64, n_layers=2, n_heads=8, n_kv_heads=2,
                             head_dim=16, d_ff=128, batch_size=4, lr=3e-3, warmup_steps=3, steps=12,
                             max_seconds=60.0, eval_windows=2, max_positions=4096, max_bytes=1_000_000),
    "tiny": LMConfig(seq_len=128, long_seq_len=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128,
                     batch_size=4, lr=3e-3, warmup_steps=3, steps=12, max_seconds=60.0, eval_windows=2,
                     max_positions=4096, max_bytes=1_000_000),
}


@dataclass
class TrainResult:
    """Where the model is and how training went."""

    path: Path
    config: LMConfig
    train_loss: float
    heldout_loss: float
    steps: int
    seconds: float
    cached: bool
    meta: dict

    def describe(self) -> dict:
        """JSON-friendly summary."""
        return {"path": str(self.path), "cached": self.cached, "steps": self.steps, "train_loss": self.train_loss,
                "heldout_loss": self.heldout_loss, "train_seconds": self.seconds}


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: CUDA is not available here")
    return torch.device(name)


def build_model(cfg: LMConfig):
    """A fresh LlamaForCausalLM for ``cfg`` (byte vocabulary, RoPE, GQA, SDPA attention)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=cfg.d_model, intermediate_size=cfg.d_ff, num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads, max_position_embeddings=cfg.max_positions,
        head_dim=cfg.head_dim or cfg.d_model // cfg.n_heads,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta}, tie_word_embeddings=False,
        bos_token_id=None, eos_token_id=EOS_ID, pad_token_id=0, use_cache=False)
    hf_cfg._attn_implementation = "sdpa"
    torch.manual_seed(cfg.seed)
    return LlamaForCausalLM(hf_cfg)


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


@torch.no_grad()
def evaluate(model, batch: torch.Tensor, device: torch.device) -> float:
    """Mean next-token loss (nats/byte) over windows (one at a time)."""
    model.eval()
    tot = 0.0
    for row in batch:
        ids = row.unsqueeze(0).to(device)
        with _autocast(device):
            tot += float(model(input_ids=ids, labels=ids).loss)
    model.train()
    return tot / batch.shape[0]


def _fingerprint(cfg: LMConfig) -> str:
    """What a resumed run must share with the checkpoint: the weight settings and the checkpoint interval."""
    return f"{cfg.key()}:eval_every={cfg.eval_every}"


def _resume(ckpt: Path, fp: str, model, opt, gen: torch.Generator, cfg: LMConfig,
            log: Callable[[str], None]) -> tuple[int, list, int, int, float]:
    """(step, history, tokens, batch rows, elapsed seconds) from the checkpoint, restored in place; a fresh start
    when there is none."""
    if not ckpt.exists():
        return 0, [], 0, cfg.batch_size, 0.0
    step, state, elapsed = load_checkpoint(ckpt, fp, model, opt, None, gen, kind=PARTIAL_KIND)
    log(f"resuming from {ckpt} at step {step}/{cfg.steps}")
    return step, state["history"], int(state["tokens"]), int(state["batch_rows"]), elapsed


def train_lm(cfg: LMConfig, out: str | Path, log: Optional[Callable[[str], None]] = None,
             resume: bool = False) -> TrainResult:
    """Train and save the HF folder (weights in bf16, shards <= 15 MB) plus ``attnlab_lm.json``.

    Every ``eval_every`` steps the model, AdamW state, data RNG, history and elapsed time go atomically to
    ``PARTIAL`` inside ``out``; with ``resume`` training continues from it (a checkpoint from other settings is
    refused) and ends as an uninterrupted run would (CPU; the time budget counts the time before the interruption)."""
    log = log or (lambda s: None)
    device = _device(cfg.device)
    corpus = _corpus(cfg, log)
    model = build_model(cfg).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model: {n_params / 1e6:.2f}M parameters, device {device}")
    opt = _optimizer(model, cfg, device)
    gen = torch.Generator().manual_seed(cfg.seed)
    held_curve = windows(corpus.heldout, cfg.seq_len, 2, contiguous=True)
    ckpt, fp = Path(out) / PARTIAL, _fingerprint(cfg)
    step, history, tokens, batch_rows, elapsed = _resume(ckpt, fp, model, opt, gen, cfg, log) if resume else (
        0, [], 0, cfg.batch_size, 0.0)
    t0 = time.perf_counter() - elapsed
    model.train()
    while step < cfg.steps:
        elapsed = time.perf_counter() - t0
        progress = max(step / cfg.steps, elapsed / cfg.max_seconds)
        if progress >= 1.0:
            break
        lr = _set_lr(opt, cfg, step, progress)
        n = cfg.long_seq_len if progress >= 1.0 - cfg.long_frac else cfg.seq_len  # length curriculum
        rows = max(1, batch_rows * cfg.seq_len // n)
        batch = windows(corpus.train, n, rows, gen).to(device, non_blocking=True)
        loss, batch_rows = _backward(model, opt, batch, device, batch_rows, log)
        if loss is None:  # out of GPU memory: the same step again at half the batch
            continue
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        tokens += batch.numel()
        if step == 1 or step % 25 == 0:
            _log_step(history, model, cfg, step, float(loss.detach()), lr, n, time.perf_counter() - t0, tokens,
                      held_curve, device, log)
        if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
            save_checkpoint(ckpt, fp, step, model, opt, None, gen, {"history": history, "tokens": tokens,
                            "batch_rows": batch_rows}, time.perf_counter() - t0, kind=PARTIAL_KIND)
            checkpoint_written()
    if device.type == "cuda":
        torch.cuda.synchronize()
    check_diverged(model, step, lr=cfg.lr)  # never evaluate, save or cache a NaN model
    seconds = time.perf_counter() - t0
    train_loss, held_loss, long_eval = _final_losses(model, corpus, cfg, device)
    check_diverged(model, step, train_loss + held_loss, cfg.lr)  # NaN/inf if either is
    log(_done_line(cfg, step, seconds, train_loss, held_loss, long_eval))
    meta = {"key": cfg.key(), "config": asdict(cfg), "device": str(device), "n_params": n_params, "steps": step,
            "tokens": tokens, "train_seconds": seconds, "train_loss": train_loss, "heldout_loss": held_loss,
            **long_eval, "final_batch_rows": batch_rows,
            "loss_unit": "nats per byte (eval on windows of seq_len)", "corpus": corpus.describe(), "history": history,
            "torch": torch.__version__}
    save_model(model, out, meta)
    ckpt.unlink(missing_ok=True)
    return TrainResult(Path(out), cfg, train_loss, held_loss, step, seconds, False, meta)


def _corpus(cfg: LMConfig, log: Callable[[str], None]):
    """The training / held-out byte corpus of ``cfg`` (held-out long enough for two long windows), logged."""
    corpus = load_corpus(cfg.corpus, cfg.heldout_frac, cfg.max_bytes, min_heldout_tokens=2 * max(cfg.seq_len, cfg.long_seq_len))
    d = corpus.describe()
    log(f"corpus: {d['source']}: {d['train_tokens']:,} training bytes ({d['train_docs']} files), "
        f"{d['heldout_tokens']:,} held-out bytes ({d['heldout_docs']} files)")
    return corpus


def _optimizer(model, cfg: LMConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on the matrices only (fused on CUDA)."""
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=cfg.lr, betas=(0.9, 0.95), fused=device.type == "cuda")


def _set_lr(opt: torch.optim.Optimizer, cfg: LMConfig, step: int, progress: float) -> float:
    """Linear warm-up then cosine decay to a tenth of ``cfg.lr`` over ``progress`` (steps or time); set and returned."""
    warm = min(1.0, (step + 1) / max(1, cfg.warmup_steps))
    lr = cfg.lr * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
    for g in opt.param_groups:
        g["lr"] = lr
    return lr


def _backward(model, opt: torch.optim.Optimizer, batch: torch.Tensor, device: torch.device, batch_rows: int,
              log: Callable[[str], None]) -> tuple[Optional[torch.Tensor], int]:
    """Loss and gradients of one batch; on GPU out-of-memory (None, half the batch rows), unless already at one."""
    try:
        with _autocast(device):
            loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        return loss, batch_rows
    except torch.OutOfMemoryError:
        if batch_rows == 1:
            raise
        loss = None
        opt.zero_grad(set_to_none=True)
        batch_rows //= 2
        log(f"out of GPU memory: batch size now {batch_rows}")
        torch.cuda.empty_cache()
        return None, batch_rows


def _log_step(history: list, model, cfg: LMConfig, step: int, lv: float, lr: float, n: int, el: float, tokens: int,
              held_curve: torch.Tensor, device: torch.device, log: Callable[[str], None]) -> None:
    """Append a point to the loss curve (held-out loss every ``eval_every`` steps) and log it; stop on divergence."""
    if not math.isfinite(lv):
        check_diverged(model, step, lv, cfg.lr)
    history.append({"step": step, "loss": lv, "lr": lr, "elapsed_s": round(el, 2)})
    history[-1]["seq_len"] = n
    if cfg.eval_every and (step == 1 or step % cfg.eval_every == 0):
        history[-1]["heldout_loss"] = evaluate(model, held_curve, device)
    log(f"step {step}: loss {lv:.4f} (len {n}) lr {lr:.2e} {tokens / max(el, 1e-9):,.0f} tok/s")


def _done_line(cfg: LMConfig, step: int, seconds: float, train_loss: float, held_loss: float, long_eval: dict) -> str:
    """The closing log line: steps, time and the final losses (also at the long length when trained there)."""
    return (f"done: {step} steps in {seconds:.0f}s; at {cfg.seq_len}: train loss {train_loss:.4f}, held-out loss "
            f"{held_loss:.4f} (nats/byte)" + (f"; at {cfg.long_seq_len}: train loss {long_eval['long_train_loss']:.4f}, "
            f"held-out loss {long_eval['long_heldout_loss']:.4f} ({long_eval['long_eval_windows']} windows)"
            if long_eval else ""))


def _final_losses(model, corpus, cfg: LMConfig, device: torch.device) -> tuple[float, float, dict]:
    """Train and held-out loss at ``seq_len`` on ``eval_windows`` windows, and at ``long_seq_len`` when trained there."""
    eg = torch.Generator().manual_seed(cfg.seed + 1)
    train_loss = evaluate(model, windows(corpus.train, cfg.seq_len, cfg.eval_windows, eg), device)
    held_loss = evaluate(model, windows(corpus.heldout, cfg.seq_len, cfg.eval_windows, contiguous=True), device)
    long_eval = {}
    if cfg.long_frac > 0:
        nl = max(1, cfg.eval_windows // max(1, cfg.long_seq_len // cfg.seq_len))
        long_eval = {
            "long_train_loss": evaluate(model, windows(corpus.train, cfg.long_seq_len, nl, eg), device),
            "long_heldout_loss": evaluate(model, windows(corpus.heldout, cfg.long_seq_len, nl, contiguous=True), device),
            "long_eval_windows": nl}
    return train_loss, held_loss, long_eval


def save_model(model, out: str | Path, meta: dict) -> None:
    """Save weights (bf16, shards <= 15 MB), config, byte tokenizer and ``attnlab_lm.json`` (written last)."""
    from transformers import ByT5Tokenizer

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / META).unlink(missing_ok=True)
    model = model.to(torch.bfloat16)
    model.config.use_cache = True
    with public_writes(out):  # the weights follow the umask like every other attnlab file
        model.save_pretrained(out, max_shard_size="15MB")
        ByT5Tokenizer(extra_ids=0).save_pretrained(out)
    write_json(out / META, meta)


def read_meta(path: str | Path) -> Optional[dict]:
    """The training record of a saved model folder, or None."""
    p = Path(path) / META
    if not p.exists():
        return None
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def load_or_train(cfg: LMConfig, out: str | Path, force: bool = False,
                  log: Optional[Callable[[str], None]] = None, resume: bool = False) -> TrainResult:
    """Reuse ``out`` when it holds a model trained with the same settings (the cache), else train (continuing
    from an interrupted run's checkpoint with ``resume``)."""
    meta = read_meta(out)
    if meta is not None and meta.get("key") == cfg.key() and not force:
        (log or (lambda s: None))(f"cached model in {out} (same settings); use --force to retrain")
        return TrainResult(Path(out), cfg, meta["train_loss"], meta["heldout_loss"], meta["steps"],
                           meta["train_seconds"], True, meta)
    return train_lm(cfg, out, log, resume=resume)


def config_from(preset: str, **overrides) -> LMConfig:
    """A preset with the given (non-None) fields replaced."""
    if preset not in PRESETS:
        raise ConfigError(f"--preset {preset!r}: choose from {', '.join(PRESETS)}")
    fields = {f.name for f in dataclasses.fields(LMConfig)}
    bad = set(overrides) - fields
    if bad:
        raise ConfigError(f"unknown LM settings {sorted(bad)}")
    return dataclasses.replace(PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None})
