"""Entmax fine-tuning of a pretrained HF encoder (MiniLM by default), cached, with an MLM-loss check.

Self-distillation: softmax attention is swapped for alpha-entmax and the model is trained (Adam) to reproduce
the final hidden states of its frozen softmax original (MSE), on BERT-masked fit windows so that it also learns
to handle [MASK] inputs as the original does. The fine-tuned weights are cached under
``$ATTNLAB_CACHE`` (default ``~/.cache/attnlab``) keyed by a fingerprint of everything that changes them
(model weights file, alpha, steps, batch, lr, mask rate, seed and the exact training windows), so a re-run
loads them instead of retraining.

MLM loss: all-MiniLM-L6-v2 ships no MLM head, so we fit one (BERT's transform dense + GELU + LayerNorm, decoder
tied to the word embeddings plus a bias) on the *softmax* original's hidden states of masked fit windows with the
encoder frozen, then measure masked-token cross-entropy on held-out windows (fixed masks) for the softmax
original, the entmax swap before fine-tuning, and the fine-tuned entmax model -- one head for all three.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from ..config import fingerprint
from ..errors import ConfigError
from ..io import read_tensors, write_tensors
from ..models.attention import check_alpha
from ..seeding import seed_everything

log = logging.getLogger(__name__)


@dataclass
class HFFinetuneConfig:
    """Entmax self-distillation settings for an HF encoder (one comment per field)."""

    steps: int = 30  # Adam steps (0 = no fine-tuning: the entmax swap only)
    batch_size: int = 4  # windows per step
    lr: float = 1e-4  # Adam learning rate
    mask_prob: float = 0.15  # BERT masking of the distillation inputs
    alpha: float = 1.5  # entmax alpha
    seed: int = 0  # data order and masking
    probe_steps: int = 60  # Adam steps of the MLM probe head (256 masked tokens each)
    cache: bool = True  # read / write the fine-tuned weights in the cache folder

    def __post_init__(self) -> None:
        check_alpha(self.alpha)
        if self.steps < 0 or self.batch_size < 1 or self.lr <= 0 or not 0 < self.mask_prob < 1 or self.probe_steps < 0:
            raise ConfigError("--hf-finetune-steps >= 0, batch >= 1, lr > 0, 0 < mask prob < 1, probe steps >= 0 required")


def cache_dir() -> Path:
    """Cache folder for fine-tuned weights: ``$ATTNLAB_CACHE`` or ``~/.cache/attnlab``."""
    return Path(os.environ.get("ATTNLAB_CACHE") or Path.home() / ".cache" / "attnlab")


def check_cache_dir() -> Path:
    """The cache folder, created and writable now: a broken ``$ATTNLAB_CACHE`` fails before the fine-tuning
    (minutes) instead of after it, when its weights would be lost."""
    d = cache_dir()
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"ATTNLAB_CACHE={d}: cannot create the cache folder ({e.strerror}); point ATTNLAB_CACHE at a "
                          "writable folder or unset it") from e
    if not os.access(d, os.W_OK | os.X_OK):
        raise ConfigError(f"ATTNLAB_CACHE={d}: the cache folder is not writable; point ATTNLAB_CACHE at a writable "
                          "folder or unset it")
    return d


def _weights_id(hf) -> str:
    """Identity of the pretrained weights: hash of the parameters (cheap enough for small encoders)."""
    h = hashlib.sha256()
    for name, p in sorted(hf.model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().float().cpu().contiguous().numpy().tobytes()[:4096])
        h.update(str(tuple(p.shape)).encode())
    return h.hexdigest()[:16]


def finetune_key(hf, windows: torch.Tensor, cfg: HFFinetuneConfig) -> str:
    """Fingerprint of a fine-tuning: weights, settings (minus cache/probe), training windows."""
    data = hashlib.sha256(windows.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]
    return fingerprint({**asdict(cfg), "weights": _weights_id(hf), "windows": [list(windows.shape), data]},
                       ignore=("cache", "probe_steps"))


def mask_inputs(ids: torch.Tensor, tokenizer, p: float, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking (80/10/10) of non-special tokens: (inputs, labels with -100 where not predicted)."""
    special = torch.zeros_like(ids, dtype=torch.bool)
    for t in (tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id):
        if t is not None:
            special |= ids == t
    pick = (torch.rand(ids.shape, generator=g) < p) & ~special
    labels = torch.where(pick, ids, torch.full_like(ids, -100))
    r = torch.rand(ids.shape, generator=g)
    inp = ids.clone()
    inp[pick & (r < 0.8)] = tokenizer.mask_token_id
    rnd = pick & (r >= 0.8) & (r < 0.9)
    inp[rnd] = torch.randint(len(tokenizer), (int(rnd.sum()),), generator=g)
    return inp, labels


def distill(hf, windows: torch.Tensor, cfg: HFFinetuneConfig, quiet: bool = False) -> dict:
    """Fine-tune ``hf`` in place: entmax attention, MSE to the frozen softmax original's hidden states."""
    from .entmax_hf import entmax_handler, hf_hidden

    g = seed_everything(cfg.seed)
    teacher = copy.deepcopy(hf.model).eval()
    handler = entmax_handler(cfg.alpha)
    opt = torch.optim.Adam([p for p in hf.model.parameters() if p.requires_grad], lr=cfg.lr)
    dev = next(hf.model.parameters()).device
    hist: dict = {"step": [], "mse": []}
    t0 = time.time()
    hf.model.train()
    for step in range(cfg.steps):
        idx = torch.randint(len(windows), (cfg.batch_size,), generator=g)
        inp, _ = mask_inputs(windows[idx], hf.tokenizer, cfg.mask_prob, g)
        inp = inp.to(dev)
        with torch.no_grad():
            target = teacher(input_ids=inp).last_hidden_state
        loss = F.mse_loss(hf_hidden(hf, inp, handler=handler, grad=True), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        hist["step"].append(step)
        hist["mse"].append(float(loss.detach()))
        if not quiet and (step % 10 == 0 or step == cfg.steps - 1):
            log.info("  entmax distillation step %4d  mse %.4f  (%.0fs)", step, float(loss.detach()), time.time() - t0)
    hf.model.eval()
    hist["seconds"] = time.time() - t0
    return hist


class MLMProbe(torch.nn.Module):
    """BERT-style MLM head on frozen hidden states; the decoder is the (frozen) word-embedding matrix."""

    def __init__(self, embeddings: torch.Tensor):
        super().__init__()
        d = embeddings.shape[1]
        self.dense = torch.nn.Linear(d, d)
        self.norm = torch.nn.LayerNorm(d)
        # on the CPU in float32, where _masked_hidden puts the hidden states (the model may sit on a GPU)
        self.register_buffer("emb", embeddings.detach().float().cpu().clone())
        self.bias = torch.nn.Parameter(torch.zeros(embeddings.shape[0]))
        with torch.no_grad():
            self.dense.weight.copy_(torch.eye(d))
            self.dense.bias.zero_()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """Logits over the vocabulary for hidden states (M, d)."""
        return self.norm(F.gelu(self.dense(h))) @ self.emb.T + self.bias


def _masked_hidden(hf, windows: torch.Tensor, handler, seed: int, p: float, batch: int = 8):
    """(hidden states at masked positions (M, d), labels (M,)) with fixed masks from ``seed``."""
    from .entmax_hf import hf_hidden

    g = torch.Generator().manual_seed(seed)
    hs, ys = [], []
    for chunk in windows.split(batch):
        inp, lab = mask_inputs(chunk, hf.tokenizer, p, g)
        h = hf_hidden(hf, inp, handler=handler)
        sel = lab != -100
        hs.append(h[sel].float().cpu())
        ys.append(lab[sel].cpu())
    return torch.cat(hs), torch.cat(ys)


def fit_probe(hf, windows: torch.Tensor, cfg: HFFinetuneConfig) -> MLMProbe:
    """Fit the MLM probe head on the softmax model's masked hidden states (encoder frozen)."""
    emb = hf.model.get_input_embeddings().weight
    h, y = _masked_hidden(hf, windows, None, cfg.seed + 1, cfg.mask_prob)
    probe = MLMProbe(emb)
    opt = torch.optim.Adam(probe.parameters(), lr=5e-3)
    g = torch.Generator().manual_seed(cfg.seed)
    for _ in range(cfg.probe_steps):
        idx = torch.randint(len(y), (min(256, len(y)),), generator=g)
        loss = F.cross_entropy(probe(h[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return probe.eval()


def probe_loss(hf, probe: MLMProbe, windows: torch.Tensor, handler, cfg: HFFinetuneConfig) -> dict:
    """Masked-token cross-entropy and accuracy of ``probe`` on ``windows`` (fixed masks)."""
    h, y = _masked_hidden(hf, windows, handler, cfg.seed + 2, cfg.mask_prob)
    with torch.no_grad():
        logits = probe(h)
        loss = F.cross_entropy(logits, y, reduction="none")
    n = len(y)
    return {"loss": float(loss.mean()), "loss_se": float(loss.std() / n ** 0.5) if n > 1 else 0.0,
            "acc": float((logits.argmax(-1) == y).float().mean()), "n_tokens": n}


def entmax_finetuned(hf, train_windows: torch.Tensor, eval_windows: torch.Tensor, cfg: HFFinetuneConfig,
                     probe_windows: Optional[torch.Tensor] = None, quiet: bool = False, probes: bool = True) -> dict:
    """Fine-tune ``hf`` for entmax in place (or load the cached result) and measure MLM probe losses
    (``probes=False``: skip them, as torchrun ranks other than 0 do after rank 0 fine-tuned and cached).

    Returns a JSON-friendly record: cache file and whether it was reused, distillation history, and MLM probe
    loss / accuracy of the softmax original, the entmax swap before and after fine-tuning on ``eval_windows``.
    """
    from .entmax_hf import entmax_handler

    t0 = time.time()
    key = finetune_key(hf, train_windows, cfg)
    path = cache_dir() / f"entmax_{Path(hf.name).name}_{key}.safetensors"
    probe_windows = train_windows if probe_windows is None else probe_windows
    rec: dict = {"config": asdict(cfg), "key": key, "cache_file": str(path), "steps": cfg.steps}
    mlm: dict = {}
    if not probes:
        mlm["skipped"] = "MLM probes not run (probes=False)"
    elif len(eval_windows):
        probe = fit_probe(hf, probe_windows, cfg)
        mlm["softmax_original"] = probe_loss(hf, probe, eval_windows, None, cfg)
        mlm["entmax_no_finetune"] = probe_loss(hf, probe, eval_windows, entmax_handler(cfg.alpha), cfg)
    else:
        log.warning("no held-out windows for the MLM loss check: MLM losses not measured")
        mlm["skipped"] = "no held-out windows"
    if cfg.steps > 0:
        if cfg.cache and path.is_file():
            tensors, meta = read_tensors(path)
            hf.model.load_state_dict(tensors)
            rec.update(cached=True, history=meta.get("history", {}))
            if not quiet:
                log.info("loaded entmax-fine-tuned weights from cache %s", path)
        else:
            if not quiet:
                log.info("fine-tuning %s for entmax (self-distillation, %d steps)", hf.name, cfg.steps)
            hist = distill(hf, train_windows, cfg, quiet=quiet)
            rec.update(cached=False, history=hist)
            if cfg.cache:
                path.parent.mkdir(parents=True, exist_ok=True)
                write_tensors(path, {k: v.detach().cpu().contiguous() for k, v in hf.model.state_dict().items()},
                              {"kind": "attnlab entmax fine-tuned HF weights", "key": key, "config": asdict(cfg),
                               "history": hist, "model": hf.name})
        if "skipped" not in mlm:
            mlm["entmax_finetuned"] = probe_loss(hf, probe, eval_windows, entmax_handler(cfg.alpha), cfg)
    rec["mlm"] = mlm
    rec["seconds"] = time.time() - t0
    return rec
