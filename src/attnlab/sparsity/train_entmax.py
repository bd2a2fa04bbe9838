"""Train entmax-attention transformers for Sparsefinder: our small model (masked LM encoder or causal LM
decoder) on a text corpus, and a pretrained HF model (MiniLM by default) with softmax swapped for entmax.

Small model: token ids from the MiniLM tokenizer are mapped to a smaller vocabulary (the ``vocab_size``
most frequent ids of the fit windows; others -> [UNK]) so that CPU training takes minutes.

HF model: softmax is replaced by alpha-entmax through the model's attention hooks. MiniLM's checkpoint has no MLM
head, so fine-tuning uses self-distillation: the entmax model is trained (Adam, a few hundred steps at most)
to reproduce the final hidden states of the frozen softmax original (MSE, padding excluded). This keeps the
representation the sentence model was trained for without inventing a head.
"""

from __future__ import annotations

import hashlib
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..config import fingerprint
from ..errors import ConfigError, NumericalError, ResultsError
from ..validate import check_fields
from ..io import checkpoint_written, read_tensors, write_tensors
from ..models.attention import check_alpha, masked_entmax
from ..models.transformer import SmallTransformer, TransformerConfig
from ..seeding import seed_everything

PAD, UNK, MASK, CLS, SEP = 0, 1, 2, 3, 4
N_SPECIAL = 5


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


class VocabMap:
    """Maps tokenizer ids to a compact vocabulary (specials first, then by frequency)."""

    def __init__(self, keep: torch.Tensor, specials: dict[str, int], full_size: int):
        self.keep = keep.long()  # original ids of compact ids N_SPECIAL..
        self.specials = specials  # name -> original id
        self.table = torch.full((full_size,), UNK, dtype=torch.long)
        self.table[self.keep] = torch.arange(N_SPECIAL, N_SPECIAL + len(self.keep))
        for name, compact in (("pad", PAD), ("unk", UNK), ("mask", MASK), ("cls", CLS), ("sep", SEP)):
            if specials.get(name) is not None:
                self.table[specials[name]] = compact

    @classmethod
    def from_windows(cls, windows: torch.Tensor, size: int, tokenizer) -> "VocabMap":
        """The ``size - 5`` most frequent non-special ids of ``windows``."""
        specials = {"pad": tokenizer.pad_token_id, "unk": tokenizer.unk_token_id, "mask": tokenizer.mask_token_id,
                    "cls": tokenizer.cls_token_id, "sep": tokenizer.sep_token_id}
        full = max(len(tokenizer), int(windows.max()) + 1)
        counts = torch.bincount(windows.flatten(), minlength=full)
        for v in specials.values():
            if v is not None:
                counts[v] = -1
        order = counts.argsort(descending=True)
        keep = order[: size - N_SPECIAL]
        keep = keep[counts[keep] > 0]
        return cls(keep, specials, full)

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        """Original ids -> compact ids."""
        return self.table[ids.clamp(0, len(self.table) - 1)]

    @property
    def size(self) -> int:
        """Compact vocabulary size."""
        return N_SPECIAL + len(self.keep)


def tokenizer_of(name: str = "minilm"):
    """The tokenizer of a model folder / alias, without loading the weights."""
    from transformers import AutoTokenizer

    from ..sources.hf import resolve_model_path

    return AutoTokenizer.from_pretrained(resolve_model_path(name))


def mlm_batch(ids: torch.Tensor, vocab: int, p: float, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking: inputs and labels (-100 where not predicted); specials are never masked."""
    can = ids >= N_SPECIAL
    pick = (torch.rand(ids.shape, generator=g) < p) & can
    labels = torch.where(pick, ids, torch.full_like(ids, -100))
    r = torch.rand(ids.shape, generator=g)
    inp = ids.clone()
    inp[pick & (r < 0.8)] = MASK
    rnd = pick & (r >= 0.8) & (r < 0.9)
    inp[rnd] = torch.randint(N_SPECIAL, vocab, (int(rnd.sum()),), generator=g)
    return inp, labels


def lm_loss(model: SmallTransformer, ids: torch.Tensor, objective: str, g: torch.Generator,
            mask_prob: float = 0.15) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss and token accuracy (on predicted positions) of one batch of compact ids."""
    if objective == "mlm":
        inp, labels = mlm_batch(ids, model.cfg.vocab_size, mask_prob, g)
    else:
        inp, labels = ids[:, :-1], ids[:, 1:]
    dev = next(model.parameters()).device
    logits = model(inp.to(dev)).logits
    labels = labels.to(dev)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
    sel = labels != -100
    acc = (logits.argmax(-1)[sel] == labels[sel]).float().mean() if bool(sel.any()) else torch.tensor(float("nan"))
    return loss, acc


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


def _rng_tensors(g: torch.Generator) -> tuple[dict[str, torch.Tensor], dict]:
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


def _restore_rng(g: torch.Generator, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    g.set_state(tensors["rng.data"])
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[f"rng.cuda.{i}"] for i in range(len([k for k in tensors if k.startswith("rng.cuda.")]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    kind, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((kind, tensors["rng.numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))


def _save_partial(path: Path, fp: str, done: int, model, opt, sched, g, hist: dict, elapsed: float) -> None:
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
    rng_t, rng_meta = _rng_tensors(g)
    tensors.update(rng_t)
    meta = {"kind": "attnlab entmax partial training", "fingerprint": fp, "step": done, "history": hist,
            "elapsed": elapsed, "optimizer": opt_meta, "scheduler": sched.state_dict(), "rng": rng_meta}
    write_tensors(path, tensors, meta)


def _load_partial(path: Path, fp: str, model, opt, sched, g) -> tuple[int, dict, float]:
    """Restore a partial checkpoint in place; returns (steps done, history, elapsed seconds)."""
    tensors, meta = read_tensors(path)
    if meta.get("kind") != "attnlab entmax partial training":
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
    sched.load_state_dict(meta["scheduler"])
    _restore_rng(g, tensors, meta["rng"])
    back = {None: float("nan"), "inf": float("inf"), "-inf": float("-inf")}  # undo JSON's NaN/inf encoding
    hist = {k: [back.get(v, v) if v is None or isinstance(v, str) else v for v in vals] if isinstance(vals, list) else vals
            for k, vals in meta["history"].items()}
    return int(meta["step"]), hist, float(meta.get("elapsed", 0.0))


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
    mcfg = TransformerConfig(vocab_size=vmap.size, d_model=cfg.d_model, n_heads=cfg.n_heads, n_layers=cfg.n_layers,
                             max_len=cfg.seq_len, causal=cfg.objective == "clm", attention="entmax", alpha=cfg.alpha,
                             learn_alpha=cfg.learn_alpha)
    model = SmallTransformer(mcfg).to(cfg.device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    warm = max(1, cfg.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + torch.cos(torch.tensor(min(s, cfg.steps) / max(cfg.steps, 1) * 3.14159)).item()))
    hist: dict = {"step": [], "loss": [], "acc": []}
    ckpt = Path(checkpoint) if checkpoint is not None else None
    fp = train_fingerprint(cfg, windows, log_every) if ckpt is not None else ""
    start, elapsed = 0, 0.0
    if ckpt is not None and resume and ckpt.exists():
        start, hist, elapsed = _load_partial(ckpt, fp, model, opt, sched, g)
        if not quiet:
            print(f"  resuming training from {ckpt} at step {start}/{cfg.steps}", flush=True)
    t0 = time.time() - elapsed
    model.train()
    for step in range(start, cfg.steps):
        idx = torch.randint(len(data), (cfg.batch_size,), generator=g)
        loss, acc = lm_loss(model, data[idx], cfg.objective, g, cfg.mask_prob)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % log_every == 0 or step == cfg.steps - 1:
            hist["step"].append(step)
            hist["loss"].append(float(loss.detach()))
            hist["acc"].append(float(acc))
            if not np.isfinite(hist["loss"][-1]):  # checked at log steps (incl. the last): no NaN model is saved
                raise NumericalError(f"training diverged: loss {hist['loss'][-1]} at step {step}; lower --lr "
                                     f"(now {cfg.lr:g})")
            if not quiet:
                print(f"  step {step:5d}  loss {float(loss):.3f}  acc {float(acc):.3f}  ({time.time() - t0:.0f}s)", flush=True)
        done = step + 1
        if ckpt is not None and cfg.checkpoint_every > 0 and done % cfg.checkpoint_every == 0 and done < cfg.steps:
            _save_partial(ckpt, fp, done, model, opt, sched, g, hist, time.time() - t0)
            checkpoint_written()
        if on_step is not None:
            on_step(done)
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


# ---------------------------------------------------------------------------------------------- HF swap
def entmax_handler(alpha: float | torch.Tensor | Sequence = 1.5, graphs: Optional[dict] = None,
                   predictors: Optional[dict] = None):
    """An attention handler computing alpha-entmax attention (float32) instead of the model's own.

    ``alpha``: one value (float or per-head tensor) for every layer, or a sequence indexed by layer.
    ``graphs`` {layer: bool (B,H,N,N)} or ``predictors`` {layer: Predictor} restrict each layer's attention to
    the given / predicted graph (downstream evaluation of predicted sparsity): the one "restrict attention
    to a graph" helper, for every attention source.
    """
    per_layer = isinstance(alpha, (list, tuple))
    for a in (alpha if per_layer else [alpha]):
        if not isinstance(a, torch.Tensor):
            check_alpha(a)

    def handler(call):
        scores = call.scores()  # float32, -inf where masked
        allowed = torch.isfinite(scores)
        if graphs is not None and call.layer in graphs:
            allowed = allowed & graphs[call.layer].to(allowed.device)
        if predictors is not None and call.layer in predictors:
            allowed = allowed & predictors[call.layer].predict(call.query, call.key, call.valid)
        a = alpha[call.layer] if per_layer else alpha
        if isinstance(a, torch.Tensor):
            a = a.to(scores.device)
        probs = masked_entmax(scores.masked_fill(~allowed, 0.0), allowed, a)
        return (probs @ call.value.float()).to(call.value.dtype)

    return handler


def hf_hidden(hf, ids: torch.Tensor, mask: Optional[torch.Tensor] = None, handler=None, grad: bool = False) -> torch.Tensor:
    """Final hidden states (B, N, D) of an HF model, with attention routed through ``handler`` if given."""
    import contextlib

    ctx = hf.hooks(handler) if handler is not None else contextlib.nullcontext()
    dev = next(hf.model.parameters()).device
    with ctx, (contextlib.nullcontext() if grad else torch.no_grad()):
        out = hf.model(input_ids=ids.to(dev), attention_mask=None if mask is None else mask.to(dev))
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def finetune_hf_entmax(hf, windows: torch.Tensor, alpha: float = 1.5, steps: int = 50, batch_size: int = 8,
                       lr: float = 2e-5, seed: int = 0, quiet: bool = False) -> dict:
    """Briefly fine-tune an HF model with entmax attention to match its own softmax hidden states (MSE).

    Teacher targets are computed first with the untouched (softmax) model; the model is then updated in
    place. Returns a history with the distillation loss before and after.
    """
    import copy

    check_alpha(alpha)
    g = seed_everything(seed)
    teacher = copy.deepcopy(hf.model).eval()
    handler = entmax_handler(alpha)
    opt = torch.optim.Adam([p for p in hf.model.parameters() if p.requires_grad], lr=lr)
    dev = next(hf.model.parameters()).device
    hist: dict = {"step": [], "mse": []}
    t0 = time.time()
    hf.model.train()
    for step in range(steps):
        idx = torch.randint(len(windows), (batch_size,), generator=g)
        ids = windows[idx].to(dev)
        with torch.no_grad():
            target = teacher(input_ids=ids).last_hidden_state
        hidden = hf_hidden(hf, ids, handler=handler, grad=True)
        loss = F.mse_loss(hidden, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        hist["step"].append(step)
        hist["mse"].append(float(loss))
        if not quiet and (step % 10 == 0 or step == steps - 1):
            print(f"  hf step {step:4d}  mse {float(loss):.4f}  ({time.time() - t0:.0f}s)", flush=True)
    hf.model.eval()
    hist["seconds"] = time.time() - t0
    return hist
