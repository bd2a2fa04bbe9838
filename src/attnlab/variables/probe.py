"""Attention probes: does the readout token's attention land on the s relevant positions?

For each layer and head, over a batch of inputs, row 0 (the readout query) of the attention matrix gives
- ``mass``: the probability mass on the relevant token positions (mean over inputs),
- ``topk_precision``: the share of the s most-attended positions that are relevant,
- the support {j : p_j > eps} (exact zeros for entmax/sparsemax; everything for softmax with eps = 0):
  ``support_precision`` |supp ∩ R| / |supp|, ``support_recall`` |supp ∩ R| / |R|, ``support_exact``
  the share of inputs whose support is exactly R, and ``support_size``.

For the bounded head every trial records its mass (:func:`relevant_mass`), so the sweep reads the mass at each
seed's m* without retraining (:func:`mass_at_mstar`); :func:`mass_cap` is the most mass the norm bounds allow.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import numpy as np
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


def mass_cap(T: int, s: int, emb: Optional[float], qk: Optional[float], d_head: int) -> float:
    """The largest readout attention mass on s of the T + 1 positions that the bounded class allows.

    Every score is x_0^T W_Q^T W_K x_t / sqrt(d_head) with ||x_t|| = ||E_tok[id_t] + E_pos[t]|| <= 2 emb and
    ||W_Q^T W_K||_2 <= ||W_Q^T W_K||_F <= qk, so |score| <= L = 4 emb^2 qk / sqrt(d_head) and the mass on s positions
    is at most s / (s + (T + 1 - s) e^{-2L}). 1.0 when a bound is unset (no cap).
    """
    if emb is None or qk is None:
        return 1.0
    L = 4.0 * emb**2 * qk / math.sqrt(d_head)
    return s / (s + (T + 1 - s) * math.exp(-2.0 * L))


def mass_at_mstar(per_seed: dict[Any, Optional[int]], trials: list[dict[str, Any]]) -> Optional[dict[str, Any]]:
    """Per seed, the recorded readout mass on the relevant positions of its (fitted) trial at m*_s; the median and
    range over seeds. None when the learner records no attention (the MLP) or no seed reached m*."""
    at = {(r["seed"], r["m"]): r for r in trials if r.get("fit", True) and "attn_mass" in r}
    rec = {str(sd): at[(sd, m)] for sd, m in per_seed.items() if m is not None and (sd, m) in at}
    if not rec:
        return None
    v = [r["attn_mass"] for r in rec.values()]
    return {"mass_per_seed": {k: r["attn_mass"] for k, r in rec.items()}, "mass_median": float(np.median(v)),
            "mass_min": float(min(v)), "mass_max": float(max(v)),
            "topk_median": float(np.median([r.get("attn_topk", np.nan) for r in rec.values()])),
            "per_seed": {k: {"m": r["m"], "test_acc": r["accuracy"], "mass": [[r["attn_mass"]]],
                             "topk_precision": [[r.get("attn_topk", float("nan"))]]} for k, r in rec.items()}}


@torch.no_grad()
def relevant_mass(model: Any, sx: torch.Tensor, mt: torch.Tensor, runs: Sequence[Any], n: int,
                   chunk: int = 64) -> dict[str, torch.Tensor]:
    """Per member of a BoundedHeads ensemble, on its first ``n`` test inputs: the readout attention mass on its task's relevant positions
    (``attn_mass``, mean over heads; ``attn_mass_max``, the best head) and the share of the s most-attended
    positions that are relevant (``attn_topk``, mean over heads). Each (E,)."""
    E, N = len(runs), sx.shape[-1]
    R = torch.zeros(E, N, dtype=torch.bool, device=sx.device)
    for e, mb in enumerate(runs):
        R[e, list(mb.task.relevant_tokens)] = True
    s = len(runs[0].task.relevant)
    n = min(n, sx.shape[1])
    mass = torch.zeros(E, model.H, device=sx.device)
    topk = torch.zeros(E, model.H, device=sx.device)
    for i in range(0, n, chunk):
        p = model.readout_attention(model.encode(sx[mt, i:min(i + chunk, n)]))  # (E, b, H, N)
        mass += (p * R[:, None, None]).sum(-1).sum(1)
        hit = torch.gather(R[:, None, None].expand_as(p), -1, p.topk(s, dim=-1).indices)
        topk += hit.float().mean(-1).sum(1)
    mass, topk = mass / n, topk / n
    return {"attn_mass": mass.mean(-1), "attn_mass_max": mass.amax(-1), "attn_topk": topk.mean(-1)}
