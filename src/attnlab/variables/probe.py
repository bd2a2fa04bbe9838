"""Attention probe: does the readout token's attention land on the s relevant positions?

For each layer and head, over a batch of inputs, row 0 (the readout query) of the attention matrix gives
- ``mass``: the probability mass on the relevant token positions (mean over inputs),
- ``topk_precision``: the share of the s most-attended positions that are relevant,
- the support {j : p_j > eps} (exact zeros for entmax/sparsemax; everything for softmax with eps = 0):
  ``support_precision`` |supp ∩ R| / |supp|, ``support_recall`` |supp ∩ R| / |R|, ``support_exact``
  the share of inputs whose support is exactly R, and ``support_size``.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from .tasks import SparseBooleanTask


@torch.no_grad()
def attention_probe(model, task: SparseBooleanTask, x: Optional[torch.Tensor] = None, n: int = 256,
                    eps: float = 0.0, seed: int = 12345) -> dict[str, Any]:
    """Per-layer, per-head readout-attention statistics on ``x`` (or ``n`` fresh samples from stream ``seed``)."""
    if x is None:
        x, _ = task.sample(n, stream=seed, noise=0.0)
    dev = next(model.parameters()).device
    was = model.training
    model.eval()
    out = model(x.to(dev), return_attention=True)
    model.train(was)
    R = torch.zeros(task.seq_len, dtype=torch.bool, device=dev)
    R[list(task.relevant_tokens)] = True
    s = len(task.relevant)
    keys = ("mass", "topk_precision", "support_precision", "support_recall", "support_exact", "support_size")
    res: dict[str, Any] = {k: [] for k in keys}
    for probs in out.attentions:  # (B, H, N, N)
        p = probs[:, :, 0, :].float()  # readout row: (B, H, N)
        mass = p[..., R].sum(-1)
        top = p.topk(s, dim=-1).indices
        topk_prec = R[top].float().mean(-1)
        supp = p > eps
        hits = (supp & R).sum(-1).float()
        size = supp.sum(-1).float()
        prec = torch.where(size > 0, hits / size.clamp_min(1), torch.zeros_like(hits))
        rec = hits / s
        exact = (supp == R).all(-1).float()
        for k, v in zip(keys, (mass, topk_prec, prec, rec, exact, size)):
            res[k].append(v.mean(0).tolist())  # per head, mean over inputs
    res.update(relevant=list(task.relevant_tokens), attention=model.cfg.attention, eps=eps, n=len(x))
    return res
