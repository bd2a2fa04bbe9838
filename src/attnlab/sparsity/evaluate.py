"""Sweeps of sparsity predictors over their operating points, and downstream evaluation with attention
restricted to predicted graphs.

Pipeline: ``capture_layers`` runs any attention source with entmax attention in every layer and keeps each
layer's q, k, valid mask and gold entmax graph; ``sweep_method`` fits one predictor per layer on the fit
data and visits its knob grid on the evaluation data, giving sparsity / recall / exact / cost per
operating point (per layer x head and averaged); ``downstream`` reruns the model with each layer's
attention restricted to the graph predicted *on the fly* from that layer's actual q and k (so errors
compound through layers as they would in deployment), scored by a task (LM loss, or hidden-state error).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from ..distributed import WindowShard, window_generator
from ..sources import as_source
from .graphs import gold_graph
from .metrics import (METRICS, HeadMetrics, average_layers, graph_metrics, merge_batches, pareto_front,
                      recall_at_sparsity)
from .predictors import BasePredictor, Projector, make_predictor


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


def gold_density(data: list[LayerData], shard: Optional[WindowShard] = None) -> list[float]:
    """Per layer, the share of valid pairs in the gold graph over every rank's windows (float64 sums)."""
    sums = torch.zeros(len(data), 2, dtype=torch.float64)
    for l, d in enumerate(data):
        v = torch.ones_like(d.gold) if d.valid is None else d.valid.expand_as(d.gold)
        sums[l] = torch.tensor([float(d.gold.sum()), float(v.sum())], dtype=torch.float64)
    if shard is not None:
        shard.sum_([sums])
    return (sums[:, 0] / sums[:, 1]).tolist()


def capture_layers(model, ids: torch.Tensor, batch_size: int = 16, alpha: float | Sequence = 1.5,
                   layers: Optional[Sequence[int]] = None) -> list[LayerData]:
    """Run ``ids`` through ``model`` with alpha-entmax attention in every layer and keep q, k, valid and the
    gold entmax graph of every chosen layer. ``alpha``: one value, or one per layer (e.g. learned per head).
    """
    from .entmax_hf import entmax_handler

    src = as_source(model)
    L = src.n_layers
    alphas = list(alpha) if isinstance(alpha, (list, tuple)) else [alpha] * L
    layers = list(range(L)) if layers is None else sorted(layers)
    store: dict[int, list] = {l: [] for l in layers}
    swap = entmax_handler(alphas)

    def handler(call):
        if call.layer in store:
            v = None if call.valid is None else call.valid.detach().cpu()
            store[call.layer].append((call.query.detach().float().cpu(), call.key.detach().float().cpu(), v,
                                      call.scaling))
        return swap(call)

    with src.hooks(handler):
        for chunk in ids.split(batch_size):
            src.forward(chunk)
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
        gold = gold_graph(q, k, valid, alphas[l], parts[0][3])
        out.append(LayerData(q, k, valid, gold, alphas[l], parts[0][3]))
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
               shard: Optional[WindowShard] = None, **kw) -> list[BasePredictor]:
    """One fitted predictor per layer (learned methods reuse ``projectors[l]`` if given, training it once).

    ``shard``: ``fit`` holds this rank's windows of a torchrun run; learned predictors fit data-parallel over every
    rank's windows and each rank gets the same predictors."""
    preds = []
    for l, d in enumerate(fit):
        p = make_predictor(method, rank=rank, epochs=epochs, seed=seed + l,
                           projector=None if projectors is None else projectors[l], **kw)
        p.force_window, p.force_cls = int(force_window), bool(force_cls)
        preds.append(p.fit(d.q, d.k, d.gold, d.valid, shard=shard))
    return preds


def _share_centroids(fitted: list[BasePredictor], knobs: list, shard: WindowShard) -> None:
    """k-means predictors: compute the centroids of every (layer, knob) once over all ranks (round-robin) and
    give each rank all of them; k-means runs on the gathered fit sample, identical on every rank, so this only
    splits work that every rank would otherwise repeat."""
    from ..distributed import gather_ordered, shard as shard_items
    from .predictors.clustering import KMeansPredictor

    if not all(isinstance(p, KMeansPredictor) for p in fitted):
        return
    jobs = [(l, int(v)) for l in range(len(fitted)) for v in knobs]
    mine = [fitted[l].with_knob(v).centroids() for l, v in shard_items(jobs, shard.info)]
    for (l, v), c in zip(jobs, gather_ordered(mine, len(jobs), shard.info, to_all=True)):
        fitted[l]._centroids[v] = c


def sweep_method(method: str, fitted: list[BasePredictor], data: list[LayerData],
                 knobs: Optional[list] = None, target: float = 0.9, shard: Optional[WindowShard] = None) -> dict:
    """Evaluate fitted per-layer predictors at every knob value; returns points, Pareto front and recall@target.

    ``shard``: ``data`` holds this rank's evaluation windows of a torchrun run; per-window metrics are gathered in
    window order (one gather per method) and every rank returns the numbers of all windows."""
    n = data[0].n
    knobs = knobs if knobs is not None else fitted[0].grid(n)
    points = []
    t0 = time.time()
    if shard is not None and shard.info.enabled:
        _share_centroids(fitted, knobs, shard)
    local = [[_predict_metrics(p.with_knob(v), d) for p, d in zip(fitted, data)] for v in knobs]
    if shard is not None and shard.info.enabled:
        # (K, L, B_local, M, H) -> every window's (K, L, M, H), in window order
        x = torch.stack([torch.stack([torch.stack([h.per_seq[m] for m in METRICS], 1) for h in row]) for row in local])
        full = torch.stack(shard.gather(list(x.permute(2, 0, 1, 3, 4).contiguous())))
        local = [[HeadMetrics.from_per_seq({m: full[:, i, l, j] for j, m in enumerate(METRICS)})
                  for l in range(len(data))] for i in range(len(knobs))]
    for v, per_layer in zip(knobs, local):
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
class _GoldOracle:
    """Predictor-like: the exact gold graph (sanity check; should not change the loss)."""

    def __init__(self, alpha):
        self.alpha = alpha

    def predict(self, q, k, valid=None):
        return gold_graph(q, k, valid, self.alpha, check=False)


def lm_eval(model, ids: torch.Tensor, objective: str, seed: int = 0, batch_size: int = 32,
            mask_prob: float = 0.15, shard: Optional[WindowShard] = None) -> dict:
    """Loss and token accuracy over every predicted token of compact ids (MLM masks fixed per window from
    (``seed``, window index), so runs are paired and the numbers do not depend on batching or sharding).

    ``shard``: ``ids`` are this rank's windows of a torchrun run; the token sums are all-reduced."""
    from .vocab import lm_token_stats, mlm_batch

    shard = shard or WindowShard.single(len(ids))
    sums = torch.zeros(3, dtype=torch.float64)  # cross-entropy, correct, predicted tokens
    with torch.no_grad():
        for s0 in range(0, len(ids), batch_size):
            chunk = ids[s0:s0 + batch_size]
            if objective == "mlm":
                pairs = [mlm_batch(chunk[i:i + 1], model.cfg.vocab_size, mask_prob,
                                   window_generator(seed, shard.indices[s0 + i])) for i in range(len(chunk))]
                inp, labels = torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])
            else:
                inp, labels = chunk[:, :-1], chunk[:, 1:]
            sums += torch.tensor([float(x) for x in lm_token_stats(model, inp, labels)], dtype=torch.float64)
    shard.sum_([sums])
    n = float(sums[2])
    return {"loss": float(sums[0]) / n if n else float("nan"), "acc": float(sums[1]) / n if n else float("nan")}


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


class LMTask:
    """Downstream score of a model with an LM head: loss and token accuracy, and their change."""

    def __init__(self, model, ids: torch.Tensor, objective: str, seed: int = 0, shard: Optional[WindowShard] = None):
        self.model, self.ids, self.objective, self.seed, self.shard = model, ids, objective, seed, shard

    def measure(self) -> dict:
        """Loss and accuracy under the current attention (over every rank's windows)."""
        return lm_eval(self.model, self.ids, self.objective, self.seed, shard=self.shard)

    def header(self, base: dict, under: Callable[[dict], dict], alphas: Sequence) -> dict:
        """Full entmax and, as a sanity check, attention restricted to the exact gold graphs."""
        return {"full_entmax": base, "gold_graph": under({l: _GoldOracle(a) for l, a in enumerate(alphas)})}

    def row(self, r: dict, base: dict) -> dict:
        """One operating point's scores."""
        return {**r, "delta_loss": r["loss"] - base["loss"], "delta_acc": r["acc"] - base["acc"]}


class HiddenTask:
    """Downstream score of an encoder without a head: final hidden states against full entmax."""

    def __init__(self, hf, ids: torch.Tensor, batch_size: int = 8, shard: Optional[WindowShard] = None):
        self.hf, self.ids, self.batch_size = hf, ids, batch_size
        self.shard = shard or WindowShard.single(len(ids))

    def measure(self) -> torch.Tensor:
        """Final hidden states of this rank's windows under the current attention."""
        from .entmax_hf import hf_hidden

        return torch.cat([hf_hidden(self.hf, c) for c in self.ids.split(self.batch_size)]).float()

    def header(self, base: torch.Tensor, under: Callable, alphas: Sequence) -> dict:
        """Full entmax is the reference itself."""
        return {"full_entmax": {"rel_error": 0.0, "cosine": 1.0}}

    def row(self, h: torch.Tensor, ref: torch.Tensor) -> dict:
        """Relative error and mean token cosine against the reference (over every rank's windows)."""
        cos = F.cosine_similarity(h.flatten(0, 1), ref.flatten(0, 1), dim=-1).double()
        sums = torch.tensor([float((h - ref).double().pow(2).sum()), float(ref.double().pow(2).sum()),
                             float(cos.sum()), float(cos.numel())], dtype=torch.float64)
        self.shard.sum_([sums])
        return {"rel_error": float(sums[0].sqrt() / sums[1].sqrt()), "cosine": float(sums[2] / sums[3])}


def downstream(model, task, alpha: float | Sequence, fitted: dict[str, list], results: dict[str, dict],
               targets: Sequence[float] = (0.8, 0.9, 0.95)) -> dict:
    """``task`` scores with every layer's entmax attention restricted to predicted graphs, per method at the
    knobs closest to ``targets`` (``task``: :class:`LMTask`, :class:`HiddenTask` or alike)."""
    from .entmax_hf import entmax_handler

    src = as_source(model)
    alphas = list(alpha) if isinstance(alpha, (list, tuple)) else [alpha] * src.n_layers

    def under(predictors: Optional[dict]):
        with src.hooks(entmax_handler(alphas, predictors=predictors)):
            return task.measure()

    base = under(None)
    out = {**task.header(base, under, alphas), "methods": {}}
    for method, preds in fitted.items():
        rows = []
        for t, knob, s, recall in operating_points(results[method], targets):
            r = under({l: p.with_knob(knob) for l, p in enumerate(preds)})
            rows.append({"target": t, "knob": knob, "sparsity": s, "recall": recall, **task.row(r, base)})
        out["methods"][method] = rows
    return out


def downstream_small(model, ids: torch.Tensor, objective: str, fitted: dict[str, list], results: dict[str, dict],
                     targets: Sequence[float] = (0.8, 0.9, 0.95), seed: int = 0) -> dict:
    """:func:`downstream` of our small entmax LM (loss / accuracy, its own per-layer alphas)."""
    alphas = [b.attn.alpha() for b in model.blocks]
    return downstream(model, LMTask(model, ids, objective, seed), alphas, fitted, results, targets)


def downstream_hf(hf, ids: torch.Tensor, alpha: float, fitted: dict[str, list], results: dict[str, dict],
                  targets: Sequence[float] = (0.8, 0.9, 0.95), batch_size: int = 8) -> dict:
    """:func:`downstream` of an HF encoder: hidden-state error against full entmax."""
    return downstream(hf, HiddenTask(hf, ids, batch_size), alpha, fitted, results, targets)
