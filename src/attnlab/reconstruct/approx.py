"""Drop-in approximate attention for HF models: chosen layers compute softmax(reconstructed scores) @ V.

Selected pairs are exact, the rest come from the estimator; the handler returns the attention output
so the rest of the model runs on it (errors compound across layers, unlike the per-layer evaluation).
Scores are computed densely and only the selected entries are read: this measures quality, not speed.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Optional

import torch
import torch.nn.functional as F

from ..attention import AttentionCall, check_heads, check_layers
from ..sources.hf import HFModel, attention_hooks, run_forward
from .evaluate import Method


class ApproxAttention:
    """Attention handler: the ``heads`` (None: every head) of a hooked layer use the reconstruction of ``method``;
    the other heads keep their exact scores."""

    def __init__(self, method: Method, heads: Optional[list[int]] = None):
        self.method, self.heads = method, heads

    def __call__(self, call: AttentionCall) -> torch.Tensor:
        scores = call.scores()  # (B, H, N, N) float32, -inf where masked
        est = scores.clone()
        heads = range(call.n_heads) if self.heads is None else self.heads
        for h in heads:
            est[:, h] = self.method.reconstruct(call, h, scores[:, h]).to(est.dtype)
        probs = torch.nan_to_num(torch.softmax(est.double(), dim=-1), nan=0.0)  # (B, H, N, N)
        return (probs.to(call.value.dtype) @ call.value)  # (B, H, N, dh)


def dropin_heads(hf: HFModel, method: Method, heads: Optional[list[int]] = None) -> list[int]:
    """The heads that use the reconstruction (default: those fitted); every other head stays exact."""
    return check_heads(heads if heads is not None else method.fit.heads, hf.n_heads)


@contextlib.contextmanager
def approximate(hf: HFModel, method: Method, layers: Optional[list[int]] = None,
                heads: Optional[list[int]] = None) -> Iterator[None]:
    """Context manager: the ``heads`` (default: those fitted) of the model's ``layers`` (default: those fitted) use
    the reconstruction; the other heads keep exact attention."""
    layers = check_layers(layers if layers is not None else method.fit.layers, hf.n_layers)
    heads = dropin_heads(hf, method, heads)
    with attention_hooks(hf, ApproxAttention(method, None if len(heads) == hf.n_heads else heads), layers):
        yield


def _lm_kind(hf: HFModel) -> Optional[str]:
    get = getattr(hf.model, "get_output_embeddings", None)
    has_head = get is not None and get() is not None
    if not has_head:
        return None
    return "causal-lm" if hf.causal else "masked-lm"


def _mlm_batch(ids: torch.Tensor, tokenizer, rate: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    specials = set(getattr(tokenizer, "all_special_ids", []))
    is_special = torch.isin(ids, torch.tensor(sorted(specials) or [-1]))
    pick = (torch.rand(ids.shape, generator=generator) < rate) & ~is_special
    masked = ids.masked_fill(pick, tokenizer.mask_token_id)
    labels = ids.masked_fill(~pick, -100)
    return masked, labels


def _outputs(hf: HFModel, ids: torch.Tensor, labels: Optional[torch.Tensor]):
    out = run_forward(hf, ids, output_hidden_states=True)
    hidden = out.hidden_states[-1] if getattr(out, "hidden_states", None) is not None else out.last_hidden_state
    loss = None
    if labels is not None and getattr(out, "logits", None) is not None:
        logits = out.logits.float()
        if hf.causal:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)
        else:
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
    return hidden.float(), loss


def output_effect(hf: HFModel, windows: torch.Tensor, method: Method, layers: Optional[list[int]] = None,
                  batch_size: int = 8, mlm_rate: float = 0.15, seed: int = 0,
                  heads: Optional[list[int]] = None) -> dict[str, Any]:
    """Change of the model's outputs when ``heads`` of ``layers`` use the reconstruction (the other heads stay
    exact; the result then lists both): mean token hidden-state cosine, mean-pooled sentence-embedding cosine, and
    the LM loss (exact vs approximate) when the model has an LM head."""
    kind = _lm_kind(hf)
    heads = dropin_heads(hf, method, heads)
    g = torch.Generator().manual_seed(seed)
    tok_cos, sent_cos, n_tok, n_seq = 0.0, 0.0, 0, 0
    loss_exact, loss_approx, n_loss = 0.0, 0.0, 0
    for ids in windows.split(batch_size):
        labels = None
        if kind == "masked-lm" and getattr(hf.tokenizer, "mask_token_id", None) is not None:
            ids, labels = _mlm_batch(ids, hf.tokenizer, mlm_rate, g)
        elif kind == "causal-lm":
            labels = ids.clone()
        h0, l0 = _outputs(hf, ids, labels)
        with approximate(hf, method, layers, heads):
            h1, l1 = _outputs(hf, ids, labels)
        tok_cos += float(F.cosine_similarity(h0, h1, dim=-1).sum())
        n_tok += h0.shape[0] * h0.shape[1]
        sent_cos += float(F.cosine_similarity(h0.mean(1), h1.mean(1), dim=-1).sum())
        n_seq += h0.shape[0]
        if l0 is not None and l1 is not None:
            loss_exact += float(l0) * ids.shape[0]
            loss_approx += float(l1) * ids.shape[0]
            n_loss += ids.shape[0]
    res: dict[str, Any] = {"method": method.combo.label, "budget_pairs": method.b,
                           "layers": check_layers(layers if layers is not None else method.fit.layers, hf.n_layers),
                           "hidden_cosine": tok_cos / max(n_tok, 1), "sentence_cosine": sent_cos / max(n_seq, 1),
                           "lm": kind}
    if len(heads) < hf.n_heads:  # a --heads subset: say which heads were replaced and which stayed exact
        res.update({"heads": heads, "exact_heads": [h for h in range(hf.n_heads) if h not in heads]})
    if n_loss:
        res.update({"loss_exact": loss_exact / n_loss, "loss_approx": loss_approx / n_loss})
    return res
