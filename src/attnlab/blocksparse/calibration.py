"""Offline per-head calibration of a block predictor's knob, saved next to the model, checked at run time.

MInference searches its head configurations once per model, offline. Here the same holds for every
calibrated block predictor (``minference``, ``flexprefill``, ``xattention``, ``pooled``, ``cluster``):

1. **fit** (:func:`fit_knobs`): on fit windows (the byte model's *training* split, so never the held-out text
   that is measured), each layer's real q, k go through the predictor's exact calibration (calibration rows,
   safety margin: ``ScoredBlockMethod._calibrate``); a head's knob is the largest over the fit windows. The
   forward itself runs dense attention, so every layer sees exact inputs.
2. **store** (:class:`KnobStore`): one JSON file in the model folder (``attnlab_knobs.json``), entries keyed by
   predictor, its options, target p, block size and N bucket (the next power of two), knobs (layers x heads),
   and the id of the weights they were fitted on (:func:`model_fingerprint`; other weights: refit).
3. **run** (:class:`OfflinePredictor`): the stored knob per layer and head gives the pattern with no
   calibration rows; recall is *checked* on ``check_rows`` held-out rows (odd positions) against exact
   attention, and a head is recalibrated (exact calibration on this input; its knob only grows) only when
   its check recall is below p by more than ``check_z`` standard errors. Check and recalibration costs are
   part of the prediction time. MInference takes the fused CUDA-graph path
   (:mod:`attnlab.blocksparse.kernels.vertical_slash`); the others run their reference code with the knob.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from ..errors import ConfigError, ShapeError
from ..io import write_json
from .blockmask import BlockPattern
from .predictors import make_block_predictor
from .predictors.core import expand_kv_heads, keep_graph, pattern_row_recall, row_block_mass, row_token_probs, \
    sample_rows

__all__ = ["KNOBS_FILE", "KnobStore", "knob_key", "model_fingerprint", "n_bucket", "fit_knobs", "fit_windows",
           "OfflinePredictor", "offline_predictor"]

KNOBS_FILE = "attnlab_knobs.json"
FORMAT = "attnlab-knobs/1"


def n_bucket(n: int) -> int:
    """The N bucket a knob is stored under: the next power of two >= n."""
    if n < 1:
        raise ConfigError(f"sequence length must be >= 1, got {n}")
    return 1 << (n - 1).bit_length()


def model_fingerprint(path: str | Path) -> Optional[str]:
    """A short id of the weights in model folder ``path``: its training record (``attnlab_lm.json``: settings
    key, losses, steps, time) or else ``config.json``, plus the names and sizes of the weight files. A model
    retrained into the same folder gets a new id, so knobs fitted on the old weights are not reused (a copied
    folder keeps its id). None when ``path`` is no folder (a hub id)."""
    path = Path(path)
    if not path.is_dir():
        return None
    h = hashlib.sha1()
    for name in ("attnlab_lm.json", "config.json"):
        f = path / name
        if f.exists():
            h.update(f.read_bytes())
            break
    for f in sorted(path.iterdir()):
        if f.suffix in (".safetensors", ".bin", ".pt") or f.name.endswith(".index.json"):
            h.update(f"{f.name}:{f.stat().st_size};".encode())
    return h.hexdigest()[:16]


def knob_key(predictor: str, p: float, n: int, block_size: int, options: Optional[dict] = None) -> str:
    """Store key: predictor, its options, target p, block size and N bucket."""
    opts = ",".join(f"{k}={options[k]}" for k in sorted(options or {}))
    return f"{predictor}[{opts}]|p={p:g}|bs={block_size}|N={n_bucket(n)}"


@dataclass
class KnobStore:
    """Per-head knobs of one model, by :func:`knob_key`; ``save`` writes the JSON file atomically."""

    path: Optional[Path] = None
    entries: dict[str, dict] = field(default_factory=dict)

    @classmethod
    def load(cls, path: str | Path) -> "KnobStore":
        """The store in ``path`` (a file, or a model folder holding ``attnlab_knobs.json``); empty if absent."""
        path = Path(path)
        if path.is_dir():
            path = path / KNOBS_FILE
        if not path.exists():
            return cls(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"--knobs {path}: not a readable knob file ({e})") from e
        if data.get("format") != FORMAT:
            raise ConfigError(f"--knobs {path}: not an attnlab knob file (format {data.get('format')!r})")
        return cls(path, dict(data.get("entries", {})))

    def get(self, key: str) -> Optional[Tensor]:
        """Knobs (layers, heads) float64 of ``key``, or None."""
        e = self.entries.get(key)
        return None if e is None else torch.tensor(e["knob"], dtype=torch.float64)

    def put(self, key: str, knob: Tensor, **info: Any) -> None:
        """Store knobs (layers, heads) with any JSON-friendly ``info`` (fit windows, recall, time)."""
        if knob.dim() != 2:
            raise ShapeError(f"knobs must be (layers, heads), got {tuple(knob.shape)}")
        self.entries[key] = {"knob": knob.double().tolist(), **info}

    def save(self) -> Path:
        """Write the store (atomic); the file is ours (format marker), so rewriting it is safe."""
        if self.path is None:
            raise ConfigError("this knob store has no file (give --knobs)")
        return write_json(self.path, {"format": FORMAT, "entries": self.entries})


# ------------------------------------------------------------------------------------------------------------
# Fit
# ------------------------------------------------------------------------------------------------------------


def fit_windows(hf: Any, seq_len: int, count: int, seed: int = 12345) -> Tensor:
    """Fit windows (count, seq_len): random windows of the byte model's training split (never its held-out
    text); other models: held-out windows after the ``count`` evaluation windows would use."""
    from ..lm.data import load_corpus, windows
    from ..lm.train import read_meta
    from .prefill import heldout_windows

    meta = read_meta(hf.name)
    if meta is None:
        return heldout_windows(hf, seq_len, 2 * count)[count:]
    cfg = meta["config"]
    keep = 2 * max(cfg.get("seq_len", 0), cfg.get("long_seq_len", 0))
    corpus = load_corpus(cfg.get("corpus"), cfg.get("heldout_frac", 0.05), cfg.get("max_bytes"),
                         min_heldout_tokens=keep)
    return windows(corpus.train, seq_len, count, torch.Generator().manual_seed(seed))


class _FitHandler:
    """AttentionInterface handler: exact calibration per layer on the real q, k; dense attention returned."""

    def __init__(self, method: Any, p: float, block_size: int):
        self.method, self.p, self.bs = method, p, block_size
        self.knobs: dict[int, Tensor] = {}
        self.recall: dict[int, list[float]] = {}

    def __call__(self, call: Any) -> Tensor:
        from .prefill.handler import _pad, dense_sdpa

        q, k, v = call.query, call.key, call.value
        n = -(-q.shape[2] // self.bs) * self.bs
        pred = self.method.predict(_pad(q, n), _pad(k, n), True, self.bs, self.p, call.scaling)
        self.knobs[call.layer] = pred.knob.double().cpu()
        self.recall[call.layer] = [float(x) for x in pred.info.get("calib_recall", [])]
        return dense_sdpa(q, k, v, call.scaling)


@torch.no_grad()
def fit_knobs(hf: Any, predictor: str, p: float, ids: Tensor, block_size: int = 128,
              options: Optional[dict] = None, log: Optional[Callable[[str], None]] = None) -> tuple[Tensor, dict]:
    """Fit per-head knobs (layers, heads) on the windows ``ids`` (W, N): the largest calibrated knob over the
    windows per layer and head. Returns (knobs, info: fit windows, calibration recall, seconds)."""
    from .prefill import prefill_hooks

    method = make_block_predictor(predictor, calibrate=True, p=p, **(options or {}))
    device = next(hf.model.parameters()).device
    handler = _FitHandler(method, p, block_size)
    t0 = time.perf_counter()
    per_window, recalls = [], []
    for w in range(ids.shape[0]):
        handler.knobs, handler.recall = {}, {}
        with prefill_hooks(hf, handler):
            hf.model(input_ids=ids[w: w + 1].to(device), use_cache=False)
        if sorted(handler.knobs) != list(range(hf.n_layers)):
            raise ConfigError(f"fit: saw attention layers {sorted(handler.knobs)}, expected {hf.n_layers}")
        per_window.append(torch.stack([handler.knobs[i] for i in range(hf.n_layers)]))
        recalls.append([handler.recall[i] for i in range(hf.n_layers)])
    knobs = torch.stack(per_window).amax(0)
    secs = time.perf_counter() - t0
    (log or (lambda s: None))(f"fitted {predictor} knobs (p={p}, N={ids.shape[1]}) on {ids.shape[0]} window(s) "
                              f"in {secs:.1f}s")
    return knobs, {"fit_windows": int(ids.shape[0]), "fit_seq_len": int(ids.shape[1]), "fit_seconds": secs,
                   "fit_calib_recall": recalls, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


# ------------------------------------------------------------------------------------------------------------
# Run time
# ------------------------------------------------------------------------------------------------------------


def _row_stats(rec: Tensor) -> tuple[Tensor, Tensor]:
    """(B, H, R) per-row recall -> (mean (H,), sd (H,))."""
    r = rec.float().transpose(0, 1).reshape(rec.shape[1], -1)
    return r.mean(-1), r.std(-1).nan_to_num(0.0)


class OfflinePredictor:
    """A block predictor with stored per-head knobs, the run-time recall check and recalibration on failure.
    Called as the prefill handler's prediction function with ``layer``; ``last_info`` describes the call."""

    wants_layer = True

    def __init__(self, predictor: str, p: float, knobs: Tensor, block_size: int = 128,
                 options: Optional[dict] = None, group: int = 1, check_rows: int = 64, check_z: float = 2.0,
                 fast: bool = True, use_graph: bool = True, seed: int = 7):
        if knobs.dim() != 2:
            raise ShapeError(f"knobs must be (layers, heads), got {tuple(knobs.shape)}")
        if check_rows < 2:
            raise ConfigError(f"--check-rows must be >= 2, got {check_rows}")
        self.name, self.p, self.bs, self.options = predictor, p, block_size, dict(options or {})
        self.knobs = knobs.double().clone()
        self.group, self.check_rows, self.check_z, self.seed = group, check_rows, check_z, seed
        self.fast = fast and predictor == "minference"
        self.use_graph = use_graph
        self.method = make_block_predictor(predictor, calibrate=False, **self.options)
        self.recalibrations: list[dict] = []
        self.last_info: dict[str, Any] = {}

    def _rows(self, n: int) -> Tensor:
        return sample_rows(n, self.check_rows, self.seed, 1)

    def _fast(self, q: Tensor, k: Tensor, knob: Tensor, scale: float
              ) -> tuple[BlockPattern, Tensor, Tensor, Tensor, float]:
        from .kernels.vertical_slash import VSParams, plan_for

        m = self.method
        params = VSParams(m.last_q, m.vertical_size, m.slash_size, m.sink_tokens, m.local_offsets, self.bs)
        plan = plan_for(q, k, scale, self._rows(q.shape[2]), params, self.group, self.use_graph)
        res = plan.run(q, k, knob.to(q.device))
        self.last_info["path"] = "graph" if plan.graphed else f"eager ({plan.why_eager})"
        B, H, N, D = q.shape
        cost = float(B * H * (min(m.last_q, N) + plan.c["qb"].numel()) * N * D)
        return BlockPattern(res.kv, self.bs, True), res.density, res.recall, res.recall_sd, cost

    def _reference(self, q: Tensor, k: Tensor, knob: Tensor, scale: float
                   ) -> tuple[BlockPattern, Tensor, Tensor, Tensor, float]:
        H = q.shape[1]
        ke = expand_kv_heads(k, H)
        state, cost = self.method.prepare(q, ke, True, self.bs, scale)
        th = self.method.thresholds(state, True, self.bs)
        pattern = self.method.build(state, keep_graph(th, knob.to(th.device, th.dtype)), True, self.bs)
        rows = self._rows(q.shape[2]).to(q.device)
        if pattern.permuted:
            rec = pattern_row_recall(pattern, rows, row_probs=row_token_probs(q, ke, rows, True, scale))
        else:
            rec = pattern_row_recall(pattern, rows, row_mass=row_block_mass(q, ke, rows, self.bs, True, scale))
        from .prefill import head_density

        mean, sd = _row_stats(rec)
        self.last_info["path"] = "reference"
        B, H, N, D = q.shape
        return pattern, head_density(pattern), mean, sd, cost + float(B * H * rows.numel() * N * D)

    def _predict(self, q: Tensor, k: Tensor, knob: Tensor, scale: float):
        return (self._fast if self.fast else self._reference)(q, k, knob, scale)

    @torch.no_grad()
    def __call__(self, q: Tensor, k: Tensor, p: float, bs: int, scale: float, layer: int = 0
                 ) -> tuple[BlockPattern, float]:
        if bs != self.bs or abs(p - self.p) > 1e-12:
            raise ConfigError(f"offline knobs were fitted for p={self.p}, block {self.bs}; called with p={p}, "
                              f"block {bs}")
        if not 0 <= layer < self.knobs.shape[0] or q.shape[1] != self.knobs.shape[1]:
            raise ShapeError(f"stored knobs are {tuple(self.knobs.shape)} (layers, heads); call has layer {layer} "
                             f"and {q.shape[1]} heads")
        B, H, N, D = q.shape
        self.last_info = {"layer": layer, "recalibrated_heads": 0}
        pattern, dens, rec, sd, macs = self._predict(q, k, self.knobs[layer], scale)
        R = self._rows(N).numel() * B
        stats = torch.stack([rec.float(), sd.float()]).cpu()  # the one host sync of the check
        bound = self.p - self.check_z * stats[1] / math.sqrt(R)
        fail = stats[0] < bound
        if bool(fail.any()):
            pattern, dens, rec = self._recalibrate(q, k, scale, layer, fail, stats[0])
            macs += float(B * H * self.method.calib_rows * N * D)
        self.last_info.update({"check_recall": [float(x) for x in rec.float().cpu()] if fail.any()
                               else [float(x) for x in stats[0]], "check_rows": R})
        return pattern, macs

    def _recalibrate(self, q: Tensor, k: Tensor, scale: float, layer: int, fail: Tensor, before: Tensor):
        ref = make_block_predictor(self.name, calibrate=True, p=self.p, **self.options)
        new = ref.predict(q, k, True, self.bs, self.p, scale).knob.double().cpu()
        old = self.knobs[layer]
        self.knobs[layer] = torch.where(fail, torch.maximum(old, new), old)
        self.recalibrations.append({"layer": layer, "heads": fail.nonzero().flatten().tolist(),
                                    "check_recall": [float(before[h]) for h in fail.nonzero().flatten()]})
        self.last_info["recalibrated_heads"] = int(fail.sum())
        pattern, dens, rec, _, _ = self._predict(q, k, self.knobs[layer], scale)
        return pattern, dens, rec


def offline_predictor(hf: Any, predictor: str, p: float, seq_len: int, block_size: int = 128,
                      store: Optional[str | Path] = None, fit_count: int = 2, options: Optional[dict] = None,
                      check_rows: int = 64, check_z: float = 2.0, fast: bool = True, use_graph: bool = True,
                      log: Optional[Callable[[str], None]] = None, save: bool = True) -> tuple[OfflinePredictor, dict]:
    """Load the model's knobs for (predictor, p, N bucket, block) from ``store`` (default: the model folder),
    fitting and saving them first when absent. Returns (predictor, record: key, fitted now?, fit info)."""
    path = Path(store) if store is not None else Path(hf.name)
    ks = KnobStore.load(path)
    n_pad = -(-seq_len // block_size) * block_size
    key = knob_key(predictor, p, n_pad, block_size, options)
    fp = model_fingerprint(hf.name)
    knobs = ks.get(key)
    stale = knobs is not None and fp is not None and ks.entries[key].get("model") not in (None, fp)
    if stale:
        (log or (lambda s: None))(f"stored {key} knobs were fitted on other weights (model id "
                                  f"{ks.entries[key].get('model')} != {fp}): refitting")
        knobs = None
    fitted = knobs is None
    if fitted:
        ids = fit_windows(hf, seq_len, fit_count)
        knobs, info = fit_knobs(hf, predictor, p, ids, block_size, options, log)
        ks.put(key, knobs, model=fp, **info)
        if save and ks.path is not None and ks.path.parent.is_dir():
            ks.save()
    entry = {k: v for k, v in ks.entries[key].items() if k != "knob"}
    if knobs.shape != (hf.n_layers, hf.n_heads):
        raise ShapeError(f"{ks.path}: knobs for {key} are {tuple(knobs.shape)}, the model has "
                         f"({hf.n_layers}, {hf.n_heads}) layers x heads")
    cfg = getattr(hf.model, "config", None)
    kv = getattr(cfg, "num_key_value_heads", None) or hf.n_heads
    pred = OfflinePredictor(predictor, p, knobs, block_size, options, hf.n_heads // kv, check_rows, check_z, fast,
                            use_graph)
    return pred, {"key": key, "store": str(ks.path), "fitted_now": fitted, "refit_stale": stale, **entry}
