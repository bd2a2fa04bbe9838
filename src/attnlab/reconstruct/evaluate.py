"""Held-out evaluation of (estimator x selection) combinations, layer by layer with exact inputs.

Every layer sees the model's own (exact) inputs: the error of each layer is measured in isolation
(the drop-in replacement in :mod:`attnlab.reconstruct.approx` measures the compounding effect).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from ..attention import AttentionCall
from ..errors import ConfigError
from .estimators import EstimatorKind, HeadEstimator, RowModel, estimator_kind
from .fit import ReconstructionFit
from .metrics import MetricSums, row_metrics
from .selection import SELECTIONS, STRATEGIES, budget_count, select


@dataclass(frozen=True)
class Combo:
    """One reconstruction method: estimator, selection and statistics variant."""

    estimator: str
    selection: str
    position: bool = False  # mean per query position + residual covariance
    pool_heads: bool = False  # statistics pooled over the heads of a layer
    var: bool = False  # add half the conditional variance to unobserved logits (lognormal mass correction)
    offset: str = "exact"  # 'exact': row mean from q . mean(k) (1 dot product per row); 'estimate': GLS from observed

    @property
    def label(self) -> str:
        """Short name, e.g. 'gaussian+pos/adaptive'."""
        extra = ("+pos" if self.position else "") + ("+pooled" if self.pool_heads else "") + ("+var" if self.var else "")
        extra += "+estoff" if self.offset == "estimate" else ""
        return f"{self.estimator}{extra}/{self.selection}"

    def validate(self) -> None:
        """Raise ConfigError for unknown names and for variants the estimator cannot run."""
        kind = estimator_kind(self.estimator)
        if self.selection not in STRATEGIES:
            raise ConfigError(f"--selections: unknown {self.selection!r} (choose from {', '.join(STRATEGIES)})")
        if self.offset not in ("exact", "estimate"):
            raise ConfigError(f"--offset must be exact or estimate (got {self.offset!r})")
        kind.validate(self)


@dataclass
class Method:
    """Everything needed to reconstruct the rows of every (layer, head) with one combo at one budget."""

    fit: ReconstructionFit
    combo: Combo
    b: int
    k: Optional[int] = None  # basis size (None: min(k90, b))
    ridge: float = 1.0
    jitter: float = 1e-5
    proxy: str = "bilinear"
    proxy_rank: int = 4
    seed: int = 0
    dtype: torch.dtype = torch.float64
    name: Optional[str] = None  # label override (frontier points); b = 0 is the pure proxy (no exact pairs)
    _est: dict = field(default_factory=dict)
    _sel: dict = field(default_factory=dict)
    _gen: Optional[torch.Generator] = None

    def reseed(self, batch: int) -> None:
        """Random selections of held-out batch ``batch`` draw from a generator keyed by (seed, batch), so they
        do not depend on which batches ran before (torchrun shards batches)."""
        self._gen = torch.Generator().manual_seed(self.seed + 1_000_003 * (batch + 1))

    @property
    def label(self) -> str:
        """Combo label plus the proxy rank where the proxy is used, e.g. 'proxy/adaptive[r=4]'."""
        if self.name:
            return self.name
        uses = self.combo.selection == "adaptive" or self.kind.reads_proxy
        return self.combo.label + (f"[r={self.proxy_rank}]" if uses else "")

    @property
    def kind(self) -> EstimatorKind:
        """The registered estimator of the combo."""
        return estimator_kind(self.combo.estimator)

    def row_model(self, layer: int, head: int) -> RowModel:
        """The fitted statistics this method uses for (layer, head)."""
        return self.fit.row_model(layer, head, self.combo.position, self.combo.pool_heads)

    def estimator(self, layer: int, head: int) -> HeadEstimator:
        """Cached estimator of (layer, head), built by the registered estimator from this method's fit."""
        key = (layer, head)
        if key not in self._est:
            self._est[key] = self.kind.build(self, layer, head)
        return self._est[key]

    def selection(self, layer: int, head: int, call: AttentionCall, scores_h: torch.Tensor,
                  valid_h: Optional[torch.Tensor]) -> torch.Tensor:
        """Key indices to compute exactly for head ``head`` of this call."""
        strat, n, B = self.combo.selection, scores_h.shape[-1], scores_h.shape[0]
        if self.b == 0:  # no exact pairs (pure proxy)
            return torch.empty(B, scores_h.shape[1], 0, dtype=torch.long, device=scores_h.device)
        if "static" in SELECTIONS.entry(strat).tags:  # fitted once per (layer, head)
            key = (layer, head)
            if key not in self._sel:
                model = self.row_model(layer, head)
                eig = self.fit.eigen(layer, head, self.combo.position, self.combo.pool_heads)
                basis = None
                if strat == "leverage":
                    k = min(self.fit.rank_for(layer, head, 0.9, self.combo.position, self.combo.pool_heads), self.b)
                    basis = model.with_basis(k, eig).basis
                self._sel[key] = select(strat, n, self.b, cov=model.cov, basis=basis, seed=self.seed + head,
                                        eigen=eig if strat == "qr" else None)
            return self._sel[key].to(scores_h.device)
        if strat == "random":
            if self._gen is None:
                self._gen = torch.Generator().manual_seed(self.seed)
            return select("random", n, self.b, batch=B, generator=self._gen).to(scores_h.device)
        if strat == "adaptive":
            return select("adaptive", n, self.b, proxy_scores=self.proxy_scores(call, head), valid=valid_h)
        return select("oracle", n, self.b, scores=scores_h, valid=valid_h)

    def reconstruct(self, call: AttentionCall, head: int, scores_h: torch.Tensor) -> torch.Tensor:
        """Reconstructed scores (B, Nq, N) of one head (-inf where masked)."""
        valid_h = None if call.valid is None else call.valid[:, 0]
        idx = self.selection(call.layer, head, call, scores_h, valid_h)
        rm = exact_row_mean(call, head, scores_h) if self.combo.offset == "exact" else None
        px = self.proxy_scores(call, head) if self.kind.reads_proxy else None
        return self.estimator(call.layer, head).estimate(scores_h, idx, valid_h, rm, px)

    def proxy_scores(self, call: AttentionCall, head: int) -> torch.Tensor:
        """The low-rank proxy scores (B, Nq, N) of every pair of one head (cost r/d_head of the full scores)."""
        px = self.fit.proxy(call.layer, head, self.proxy, self.proxy_rank, self.seed)
        return px.scores(call.query[:, head], call.key[:, head], call.scaling)


def exact_row_mean(call: AttentionCall, head: int, scores_h: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean score of every row over its valid keys, (B, Nq): q . mean_valid(k) * scaling, one dot product per row.

    With an additive bias (ALiBi) or a softcap the scores are not linear in k; then the mean of ``scores_h`` is used
    (which needs every score: no saving)."""
    q, k = call.query[:, head].float(), call.key[:, head].float()  # (B, N, dh)
    if call.bias is not None or call.softcap:
        if scores_h is None:
            raise ConfigError("exact row mean needs the scores for models with attention bias or softcap")
        v = torch.isfinite(scores_h)
        return torch.where(v, scores_h, torch.zeros_like(scores_h)).sum(-1) / v.sum(-1).clamp_min(1)
    if call.valid is None:
        kbar = k.mean(-2, keepdim=True)  # (B, 1, dh)
        return (q * kbar).sum(-1) * call.scaling
    w = call.valid[:, 0].float()  # (B, Nq, N)
    kbar = (w @ k) / w.sum(-1, keepdim=True).clamp_min(1)  # (B, Nq, dh)
    return (q * kbar).sum(-1) * call.scaling


def make_methods(fit: ReconstructionFit, combos: list[Combo], budget: float | int, **kw: Any) -> list[Method]:
    """One :class:`Method` per combo at a budget (fraction or count per row)."""
    b = budget_count(budget, fit.seq_len)
    out = []
    for c in combos:
        c.validate()
        kind = estimator_kind(c.estimator)
        if (c.selection == "adaptive" or kind.reads_proxy) and kw.get("proxy", "bilinear") != "random" \
                and fit.meta.get("d_head") is None:
            raise ConfigError("--selection adaptive with a fitted proxy needs a corpus fit (query/key moments); "
                              "this fit came from a spectrum run: use --proxy random")
        kind.check(fit, b, kw)  # fail before evaluating anything (a --k above the budget, missing statistics)
        out.append(Method(fit, c, b, **kw))
    return out


def merge_timing(timing: dict[str, float], info: Any) -> dict[str, float]:
    """Estimator seconds summed over ranks (total compute, not wall time)."""
    from ..distributed import gather_lists

    out: dict[str, float] = {}
    for part in gather_lists([timing], info, to_all=True):
        for k, v in part.items():
            out[k] = out.get(k, 0.0) + v
    return out


def evaluate(model, windows: torch.Tensor, methods: list[Method], layers: Optional[list[int]] = None,
             heads: Optional[list[int]] = None, batch_size: int = 8, topk: int = 5,
             progress: bool = False) -> dict[str, Any]:
    """Per-layer / per-head held-out metrics of every method; keys are method labels (with the budget)."""
    from ..attention import check_heads, check_layers
    from ..capture.run import n_heads_of, n_layers_of, stream_attention

    fit = methods[0].fit
    layers = check_layers(layers if layers is not None else fit.layers, n_layers_of(model))
    heads = check_heads(heads if heads is not None else fit.heads, n_heads_of(model))
    fit.check(seq_len=windows.shape[1])
    from ..distributed import current_info

    info = current_info()  # under torchrun: this rank's batches (round-robin); row-metric sums merged below
    n_batches = -(-len(windows) // batch_size)
    mine = list(range(info.rank, n_batches, info.world_size))
    windows = windows[[i for b in mine for i in range(b * batch_size, min((b + 1) * batch_size, len(windows)))]]
    sums = MetricSums()
    timing: dict[str, float] = {}

    def reseed(j: int) -> None:  # random selections draw per global batch, whichever rank runs it
        if j < len(mine):
            for m in methods:
                m.reseed(mine[j])

    def sink(call: AttentionCall) -> None:
        if call.layer not in layers:
            return
        scores = call.scores()  # (B, H, N, N) float32, -inf where masked
        valid = None if call.valid is None else call.valid[:, 0]
        row_ok = None if valid is None else valid.any(-1).expand(scores.shape[0], -1)
        for h in heads:
            s = scores[:, h]
            for m in methods:
                t0 = time.perf_counter()
                est = m.reconstruct(call, h, s)
                timing[m.label] = timing.get(m.label, 0.0) + time.perf_counter() - t0
                sums.add((m.label, call.layer, h), row_metrics(s, est, valid, topk), row_ok)

    if len(windows):
        reseed(0)
        stream_attention(model, windows, sink, layers, batch_size, desc="reconstruct eval", show_progress=progress,
                         on_batch_end=lambda j: reseed(j + 1))
    if info.enabled:
        sums.merge_ranks(info)
        timing = merge_timing(timing, info)
    means = sums.means()
    return {m.label: _method_entry(m, means, layers, heads, timing.get(m.label, 0.0)) for m in methods}


def _method_entry(m: Method, means: dict, layers: list[int], heads: list[int], seconds: float) -> dict[str, Any]:
    """One method's results: its combo, the metrics per head, per layer (mean over heads) and overall (mean over
    layers), and the seconds its reconstruction took."""
    lab = m.label
    per_head = {f"{l}.{h}": means[(lab, l, h)] for l in layers for h in heads}
    per_layer = {}
    for l in layers:
        vals = [means[(lab, l, h)] for h in heads]
        per_layer[str(l)] = {met: sum(v[met] for v in vals) / len(vals) for met in vals[0]}
    overall = {met: sum(v[met] for v in per_layer.values()) / len(per_layer) for met in next(iter(per_layer.values()))}
    return {"estimator": m.combo.estimator, "selection": m.combo.selection, "position": m.combo.position,
            "pool_heads": m.combo.pool_heads, "var": m.combo.var, "offset": m.combo.offset,
            "proxy_rank": m.proxy_rank if "[r=" in lab else None, "budget_pairs": m.b, "per_layer": per_layer,
            "per_head": per_head, "mean": overall, "seconds": round(seconds, 3)}
