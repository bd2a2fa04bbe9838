"""Entmax attention for any attention source, and a brief entmax fine-tune of a pretrained HF model.

:func:`entmax_handler` replaces a model's softmax by alpha-entmax through its attention hooks, optionally
restricted to given or predicted graphs (the one "restrict attention to a graph" helper). MiniLM's
checkpoint has no MLM head, so :func:`finetune_hf_entmax` uses self-distillation: the entmax model is
trained (Adam, a few hundred steps at most) to reproduce the final hidden states of the frozen softmax
original (MSE, padding excluded). This keeps the representation the sentence model was trained for
without inventing a head.
"""

from __future__ import annotations

import logging
import time
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from ..models.attention import check_alpha, masked_entmax
from ..seeding import seed_everything
from ..training import train_steps

_log = logging.getLogger(__name__)


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

    def step_loss(step: int) -> torch.Tensor:
        ids = windows[torch.randint(len(windows), (batch_size,), generator=g)].to(dev)
        with torch.no_grad():
            target = teacher(input_ids=ids).last_hidden_state
        return F.mse_loss(hf_hidden(hf, ids, handler=handler, grad=True), target)

    def after_step(done: int, loss: torch.Tensor) -> None:
        hist["step"].append(done - 1)
        hist["mse"].append(float(loss))
        if not quiet and ((done - 1) % 10 == 0 or done == steps):
            _log.info(f"  hf step {done - 1:4d}  mse {float(loss):.4f}  ({time.time() - t0:.0f}s)")

    train_steps(hf.model, opt, steps, step_loss, after_step=after_step)
    hf.model.eval()
    hist["seconds"] = time.time() - t0
    return hist
