"""Sweeps of sparsity predictors over their operating points, and downstream evaluation with attention
restricted to predicted graphs.

Pipeline: ``capture_layers`` runs a model (our SmallTransformer, or an HF model with entmax swapped in)
and keeps each layer's q, k, valid mask and gold entmax graph; ``sweep_method`` fits one predictor per
layer on the fit data and visits its knob grid on the evaluation data, giving sparsity / recall / exact /
cost per operating point (per layer x head and averaged); ``downstream_small`` / ``downstream_hf``
rerun the model with each layer's attention restricted to the graph predicted *on the fly* from that
layer's actual q and k (so errors compound through layers as they would in deployment).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from ..capture.run import hooks
from ..models.attention import dense_attention
from ..models.transformer import SmallTransformer
from .graphs import gold_graph
from .metrics import average_layers, graph_metrics, merge_batches, pareto_front, recall_at_sparsity
from .predictors import LEARNED, METHODS, BasePredictor, Projector, make_predictor


@dataclass
class LayerData:
    """One layer's captured tensors (CPU): q, k (B, H, N, dh), valid (broadcastable bool or None), gold graph."""

    q: torch.Tensor
    k: torch.Tensor
    valid: Optional[torch.Tensor]
    gold: torch.Tensor
    alpha: float | torch.Tensor
    scaling: float

    @property
    def n(self) -> int:
        """Sequence length."""
        return self.q.shape[2]

    def density(self) -> float:
        """Share of valid pairs in the gold graph (1 - gold sparsity)."""
        v = torch.ones_like(self.gold) if self.valid is None else self.valid.expand_as(self.gold)
        return float(self.gold.sum() / v.sum())


def _alpha_of(model, layer: int, alpha: float):
    if isinstance(model, SmallTransformer):
        a = model.blocks[layer].attn.alpha()
        return a.detach().cpu() if isinstance(a, torch.Tensor) else a
    return alpha


def capture_layers(model, ids: torch.Tensor, batch_size: int = 16, alpha: float = 1.5,
                   layers: Optional[Sequence[int]] = None) -> list[LayerData]:
    """Run ``ids`` through ``model`` and keep q, k, valid and the gold entmax graph of every chosen layer.

    For an HF model the handler also *replaces* softmax by entmax (so deeper layers see entmax inputs).
    """
    from ..capture.run import forward, n_layers_of
    from .train_entmax import entmax_handler

    L = n_layers_of(model)
    layers = list(range(L)) if layers is None else sorted(layers)
    store: dict[int, list] = {l: [] for l in layers}
    swap = None if isinstance(model, SmallTransformer) else entmax_handler(alpha)

    def handler(call):
        if call.layer in store:
            v = None if call.valid is None else call.valid.detach().cpu()
            store[call.layer].append((call.query.detach().float().cpu(), call.key.detach().float().cpu(), v,
                                      call.scaling))
        return None if swap is None else swap(call)

    with hooks(model, handler, list(range(L))):
        for chunk in ids.split(batch_size):
            forward(model, chunk)
    out = []
    for l in layers:
        parts = store[l]
        q = torch.cat([p[0] for p in parts])
        k = torch.cat([p[1] for p in parts])
        vs = [p[2] for p in parts]
        if all(v is None for v in vs):
            valid = None
        else:
            valid = torch.cat([(torch.ones(p[0].shape[0], 1, q.shape[2], q.shape[2], dtype=torch.bool) if v is None
                                else v.expand(p[0].shape[0], -1, -1, -1)) for p, v in zip(parts, vs)])
            if bool(valid.all()):
                valid = None
        a = _alpha_of(model, l, alpha)
        gold = gold_graph(q, k, valid, a, parts[0][3])
        out.append(LayerData(q, k, valid, gold, a, parts[0][3]))
    return out


def predictor_ops(pred: BasePredictor, valid: Optional[torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
    """``pred.cost(n, pairs)`` per (sequence, head) (B, H), with n and the candidate pairs of each sequence."""
    B, H, N, _ = shape
    if valid is None:
        return torch.full((B, H), float(pred.cost(N, N * N)), dtype=torch.float64)
    v = valid.bool().expand(B, -1, -1, -1)[:, 0]  # (B, N, N): the mask is shared by heads
    pairs = v.sum(dim=(-1, -2)).tolist()
    ns = v.any(-1).sum(-1).tolist()
    memo: dict = {}
    vals = [memo.setdefault((n, p), float(pred.cost(int(n), float(p)))) for n, p in zip(ns, pairs)]
    return torch.tensor(vals, dtype=torch.float64).view(B, 1).expand(B, H)


def _predict_metrics(pred: BasePredictor, data: LayerData, chunk: int = 64):
    parts = []
    for s in range(0, data.q.shape[0], chunk):
        sl = slice(s, s + chunk)
        v = None if data.valid is None else data.valid[sl] if data.valid.shape[0] > 1 else data.valid
        q, k = data.q[sl], data.k[sl]
        g = pred.predict(q, k, v)
        parts.append(graph_metrics(g, data.gold[sl], v, predictor_ops(pred, v, tuple(g.shape)),
                                   pred.compute_ops(q, k, v)))
    return merge_batches(parts)


def fit_layers(method: str, fit: list[LayerData], rank: int = 4, epochs: int = 20, seed: int = 0,
               projectors: Optional[list[Projector]] = None, force_window: int = -1, force_cls: bool = False,
               **kw) -> list[BasePredictor]:
    """One fitted predictor per layer (learned methods reuse ``projectors[l]`` if given, training it once)."""
    preds = []
    for l, d in enumerate(fit):
        p = make_predictor(method, rank=rank, epochs=epochs, seed=seed + l,
                           projector=None if projectors is None else projectors[l], **kw) \
            if method in LEARNED else make_predictor(method, rank=rank, epochs=epochs, seed=seed + l, **kw)
        p.force_window, p.force_cls = int(force_window), bool(force_cls)
        preds.append(p.fit(d.q, d.k, d.gold, d.valid))
    return preds


def sweep_method(method: str, fitted: list[BasePredictor], data: list[LayerData],
                 knobs: Optional[list] = None, target: float = 0.9) -> dict:
    """Evaluate fitted per-layer predictors at every knob value; returns points, Pareto front and recall@target."""
    n = data[0].n
    knobs = knobs if knobs is not None else fitted[0].grid(n)
    points = []
    t0 = time.time()
    for v in knobs:
        per_layer = [_predict_metrics(p.with_knob(v), d) for p, d in zip(fitted, data)]
        agg = average_layers(per_layer)
        points.append({"knob": v, **agg})
    sr = [(p["mean"]["sparsity"], p["mean"]["recall"]) for p in points]
    front = pareto_front(sr)
    L = len(data)
    per_layer = [recall_at_sparsity([(p["per_layer"]["sparsity"][l], p["per_layer"]["recall"][l]) for p in points],
                                    target) for l in range(L)]
    near = min(points, key=lambda p: abs(p["mean"]["sparsity"] - target))
    return {"method": method, "knob": fitted[0].knob, "points": points, "front": front,
            f"recall_at_{target:g}": recall_at_sparsity(sr, target), f"recall_at_{target:g}_per_layer": per_layer,
            f"windows_at_{target:g}": {"knob": near["knob"], **near.get("windows", {})},
            "seconds": time.time() - t0}


def closest_knob(result: dict, sparsity: float) -> tuple:
    """(knob, achieved sparsity) of the sweep point whose mean sparsity is closest to ``sparsity``."""
    best = min(result["points"], key=lambda p: abs(p["mean"]["sparsity"] - sparsity))
    return best["knob"], best["mean"]["sparsity"]


# ---------------------------------------------------------------------------------------------- downstream
def restricted_override(model: SmallTransformer, predictors: dict[int, Callable]):
    """Override computing each layer's entmax attention only on the graph its predictor gives for (q, k)."""

    def override(q, k, v, allowed, layer):
        alpha = model.blocks[layer].attn.alpha()
        pred = predictors[layer]
        g = pred.predict(q, k, allowed) if hasattr(pred, "predict") else pred(q, k, allowed)
        m = g if allowed is None else (g & allowed)
        return dense_attention(q, k, v, m, model.cfg.attention, alpha)

    return override


class _GoldOracle:
    """Predictor-like: the exact gold graph (sanity check; should not change the loss)."""

    def __init__(self, alpha):
        self.alpha = alpha

    def predict(self, q, k, valid=None):
        return gold_graph(q, k, valid, self.alpha, check=False)


def lm_eval(model: SmallTransformer, ids: torch.Tensor, objective: str, seed: int = 0, batch_size: int = 32,
            mask_prob: float = 0.15) -> dict:
    """Mean loss and token accuracy on compact ids (fixed MLM masks from ``seed``, so runs are paired)."""
    from .train_entmax import lm_loss

    g = torch.Generator().manual_seed(seed)
    tot_l, tot_a, n = 0.0, 0.0, 0
    with torch.no_grad():
        for chunk in ids.split(batch_size):
            loss, acc = lm_loss(model, chunk, objective, g, mask_prob)
            tot_l += float(loss) * len(chunk)
            tot_a += float(acc) * len(chunk)
            n += len(chunk)
    return {"loss": tot_l / n, "acc": tot_a / n}


def operating_points(result: dict, targets: Sequence[float]) -> list[tuple[float, Any, float, float]]:
    """(target, knob, sparsity, recall) of the swept point closest to each target sparsity, each knob once."""
    out, seen = [], set()
    for t in targets:
        knob, s = closest_knob(result, t)
        if knob in seen:
            continue
        seen.add(knob)
        pt = next(p for p in result["points"] if p["knob"] == knob)
        out.append((t, knob, s, pt["mean"]["recall"]))
    return out


def downstream_small(model: SmallTransformer, ids: torch.Tensor, objective: str, fitted: dict[str, list],
                     results: dict[str, dict], targets: Sequence[float] = (0.8, 0.9, 0.95), seed: int = 0) -> dict:
    """Loss / accuracy with every layer restricted to predicted graphs, per method at knobs closest to ``targets``."""
    base = lm_eval(model, ids, objective, seed)
    L = model.cfg.n_layers
    model.set_override(restricted_override(model, {l: _GoldOracle(model.blocks[l].attn.alpha()) for l in range(L)}))
    try:
        gold = lm_eval(model, ids, objective, seed)
    finally:
        model.set_override(None)
    out = {"full_entmax": base, "gold_graph": gold, "methods": {}}
    for method, preds in fitted.items():
        rows = []
        for t, knob, s, recall in operating_points(results[method], targets):
            model.set_override(restricted_override(model, {l: p.with_knob(knob) for l, p in enumerate(preds)}))
            try:
                r = lm_eval(model, ids, objective, seed)
            finally:
                model.set_override(None)
            rows.append({"target": t, "knob": knob, "sparsity": s, "recall": recall, **r,
                         "delta_loss": r["loss"] - base["loss"], "delta_acc": r["acc"] - base["acc"]})
        out["methods"][method] = rows
    return out


def downstream_hf(hf, ids: torch.Tensor, alpha: float, fitted: dict[str, list], results: dict[str, dict],
                  targets: Sequence[float] = (0.8, 0.9, 0.95), batch_size: int = 8) -> dict:
    """For an HF encoder (no LM head): relative error and cosine of final hidden states against full entmax."""
    from .train_entmax import entmax_handler, hf_hidden

    def hidden(handler):
        return torch.cat([hf_hidden(hf, c, handler=handler) for c in ids.split(batch_size)]).float()

    ref = hidden(entmax_handler(alpha))

    def compare(h):
        rel = float((h - ref).norm() / ref.norm())
        cos = float(F.cosine_similarity(h.flatten(0, 1), ref.flatten(0, 1), dim=-1).mean())
        return {"rel_error": rel, "cosine": cos}

    out = {"full_entmax": {"rel_error": 0.0, "cosine": 1.0}, "methods": {}}
    for method, preds in fitted.items():
        rows = []
        for t, knob, s, recall in operating_points(results[method], targets):
            h = hidden(entmax_handler(alpha, predictors={l: p.with_knob(knob) for l, p in enumerate(preds)}))
            rows.append({"target": t, "knob": knob, "sparsity": s, "recall": recall, **compare(h)})
        out["methods"][method] = rows
    return out


def default_methods() -> tuple[str, ...]:
    """All methods evaluated by default."""
    return METHODS
