"""The prefill measurement: settings, the predictor by name, and the run over held-out windows (every mode
on every window, ranks sharded round-robin under torchrun)."""

from __future__ import annotations

import statistics
import time
import warnings
from dataclasses import asdict
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from ...distributed import (DistInfo, barrier, broadcast_object, device_for, gather_lists, gather_ordered,
                            init_distributed, require_work_per_rank, shard_indices)
from ...errors import ConfigError
from ..predictors import BLOCK_PREDICTORS, make_block_predictor
from .breakeven import breakeven_density
from .handler import PredictFn, PrefillHandler, predict_fn
from .model import heldout_windows, load_causal_model, timed_forward, window_loss
from .config import NOTICE_CPU, PrefillConfig
from .summary import summarise

__all__ = ["NOTICE_CPU", "PrefillConfig", "layer_paths", "make_predictor", "predictor_names", "run_prefill"]



def predictor_names() -> list[str]:
    """Every name ``--predictor`` accepts: the block-predictor registry's (``full`` keeps every tile)."""
    return list(BLOCK_PREDICTORS.names())


def make_predictor(name: str, **options: Any) -> PredictFn:
    """Deprecated: ``predict_fn(make_block_predictor(name, flag="--predictor", **options))``."""
    warnings.warn("attnlab.blocksparse.prefill.make_predictor is deprecated: use "
                  "prefill.predict_fn(predictors.make_block_predictor(name, ...))", DeprecationWarning, stacklevel=2)
    return predict_fn(make_block_predictor(name, flag="--predictor", **options))


def _device(cfg: PrefillConfig, info: Optional[DistInfo]) -> tuple[DistInfo, torch.device]:
    if cfg.device == "auto":
        dev_name = "cuda" if torch.cuda.is_available() else "cpu"
    else:
        dev_name = cfg.device
        if dev_name.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(f"--device {cfg.device}: CUDA is not available here")
    info = info or init_distributed(dev_name)
    return info, torch.device(device_for(info, dev_name))


def _inputs(cfg: PrefillConfig, hf: Any, ids: Optional[Tensor], info: DistInfo, device: torch.device,
            log: Callable[[str], None]) -> tuple[Any, Tensor, list[str], int]:
    """(model, token windows on ``device``, notices, padded length), every input checked."""
    cuda = device.type == "cuda"
    if hf is None:
        hf = load_causal_model(cfg.model, device, torch.bfloat16 if cuda else torch.float32)
    elif not hf.causal:
        raise ConfigError(f"--model {hf.name}: not a causal language model")
    if cfg.seq_len > hf.max_len:
        raise ConfigError(f"--seq-len {cfg.seq_len} exceeds the model's max_position_embeddings {hf.max_len}")
    notices = []
    if not cuda:
        notices.append(NOTICE_CPU)
        log(f"notice: {NOTICE_CPU}")
    if ids is None:
        ids = heldout_windows(hf, cfg.seq_len, cfg.windows)
    if ids.shape[1] != cfg.seq_len:
        raise ConfigError(f"token windows have length {ids.shape[1]}, not --seq-len {cfg.seq_len}")
    require_work_per_rank(ids.shape[0], info, "--windows")
    n_pad = -(-cfg.seq_len // cfg.block_size) * cfg.block_size
    if n_pad != cfg.seq_len:
        notices.append(f"--seq-len {cfg.seq_len} is not a multiple of --block-size {cfg.block_size}: q, k, v are "
                       f"zero-padded to {n_pad} inside each attention call (causal: padding is never attended)")
    return hf, ids.to(device), notices, n_pad


def _breakeven(cfg: PrefillConfig, hf: Any, info: DistInfo, device: torch.device, n_pad: int,
               log: Callable[[str], None]) -> Optional[dict]:
    """The kernel break-even density (CUDA with --fallback): measured on rank 0 and shared, so every rank
    applies the same threshold."""
    if not (device.type == "cuda" and cfg.fallback):
        return None
    be = None
    if info.is_main:
        be = breakeven_density(n_pad, hf.n_heads, hf.head_dim, next(hf.model.parameters()).dtype, device,
                               cfg.block_size)
    be = broadcast_object(be, info)
    log(f"kernel break-even density at N={n_pad}, head_dim={hf.head_dim}: {be['breakeven']:.3f} of causal tiles")
    return be


def _handlers(cfg: PrefillConfig, predict: PredictFn, threshold: Optional[float], cuda: bool,
              kernel_options: Optional[dict] = None, windows: Optional[list] = None
              ) -> tuple[PrefillHandler, dict[str, PrefillHandler], list[tuple[str, PrefillHandler]]]:
    """(measuring handler, dense handlers by backend, every timed mode in order); ``windows``: each layer's
    sliding window from the config (checked against what the model passes)."""
    def sparse(measure: bool = False, rows: bool = True) -> PrefillHandler:
        kw = {"rows": cfg.rows} if rows else {}
        return PrefillHandler("sparse", predict, cfg.recall, cfg.block_size, threshold, measure=measure,
                              seed=cfg.seed, head_policy=cfg.head_policy, kernel_options=kernel_options,
                              remainder=cfg.remainder, windows=windows, **kw)

    measure = sparse(measure=True)
    dense = {m: PrefillHandler(m, block_size=cfg.block_size, windows=windows)
             for m in (("flash", "cudnn") if cuda else ("auto",))}
    # 'unguarded': every layer predicted and run sparse; 'sparse' (as executed): layers whose measured
    # prediction + sparse attention time was not below dense cuDNN on the first window run dense (no prediction)
    unguarded = [("unguarded", sparse(rows=False))] if cuda and cfg.fallback else []
    return measure, dense, [*dense.items(), *unguarded, ("sparse", sparse())]


def _decide_dense_layers(layer_times: dict, sparse: PrefillHandler, info: DistInfo,
                         log: Callable[[str], None]) -> list[int]:
    """Layers whose prediction + sparse attention was not faster than cuDNN on window 0 (rank 0's decision,
    shared with every rank) run dense from now on."""
    lt_s, lt_d = layer_times["unguarded"], layer_times["cudnn"]
    dense_layers = sorted(i for i in lt_s if statistics.median(lt_s[i]) >= statistics.median(lt_d[i]))
    dense_layers = broadcast_object(dense_layers, info)
    sparse.dense_layers = set(dense_layers)
    if dense_layers:
        log(f"layers run dense (prediction + sparse attention not faster than cuDNN): {dense_layers}")
    return dense_layers


def _time_mode(hf: Any, h: PrefillHandler, x: Tensor, reps: int, timings: dict, layer_times: dict,
               cuda: bool, layer_pred: Optional[dict] = None) -> float:
    """``reps`` timed forwards of window ``x`` through ``h`` (samples appended); returns the first's loss."""
    loss = float("nan")
    for r in range(reps):
        logits, att, tot = timed_forward(hf, h, x)
        if r == 0:
            loss = window_loss(logits, x)
        pred_ms = h.prediction_ms()
        timings["attention_ms"].append(att)
        timings["forward_ms"].append(tot)
        timings["prediction_ms"].append(pred_ms)
        timings["kernel_ms"].append(att - pred_ms)
        if cuda:
            for i, ms in h.layer_ms().items():
                layer_times.setdefault(i, []).append(ms)
            if layer_pred is not None:
                for i, ms in h.layer_prediction_ms().items():
                    layer_pred.setdefault(i, []).append(ms)
        del logits
    return loss


def _window(w: int, measure: PrefillHandler, dense: dict, losses: dict, loss_sparse: float) -> dict:
    """The per-window record."""
    ref_name = "cudnn" if "cudnn" in dense else "auto"
    return {"window": w, "loss_dense": losses[ref_name], "loss_dense_by_backend": {k: losses[k] for k in dense},
            "loss_sparse": loss_sparse, "loss_delta": loss_sparse - losses[ref_name],
            "loss_executed": losses["sparse"], "loss_delta_executed": losses["sparse"] - losses[ref_name],
            "layers": [asdict(r) for r in measure.records]}


def _merge_ranks(per_window: list, timings: dict, layer_times: dict, layer_pred: dict, n_windows: int,
                 info: DistInfo) -> tuple[list, dict, dict, dict]:
    """Every rank gets the merged records and timing samples (window order; ranks in order)."""
    if not info.enabled:
        return per_window, timings, layer_times, layer_pred
    per_window = gather_ordered(per_window, n_windows, info, to_all=True)
    parts = gather_lists([(timings, layer_times, layer_pred)], info, to_all=True)
    timings = {m: {k: [x for pt in parts for x in pt[0][m][k]] for k in d} for m, d in timings.items()}

    def merge(j: int, mine: dict) -> dict:
        return {m: {i: [x for pt in parts for x in pt[j][m].get(i, [])]
                    for i in sorted({i for pt in parts for i in pt[j][m]})} for m in mine}

    return per_window, timings, merge(1, layer_times), merge(2, layer_pred)


def _is_calibrated(name: str) -> bool:
    """Whether registry predictor ``name`` calibrates a knob (the oracle and 'full' do not)."""
    return name in BLOCK_PREDICTORS.names() and bool(getattr(BLOCK_PREDICTORS.get(name), "calibrate", False))


def _predictor(cfg: PrefillConfig, hf: Any, info: DistInfo, log: Callable[[str], None]
               ) -> tuple[PredictFn, Optional[dict]]:
    """The prediction function and, with ``--calibration offline`` on a calibrated predictor, the knob record
    (per-head knobs loaded from the store next to the model, or fitted on training-split windows first)."""
    if cfg.calibration == "offline" and _is_calibrated(cfg.predictor):
        from ..calibration import offline_predictor

        return offline_predictor(hf, cfg.predictor, cfg.recall, cfg.seq_len, cfg.block_size, cfg.knobs,
                                 cfg.fit_windows, check_rows=cfg.check_rows, log=log, save=info.is_main)
    return predict_fn(make_block_predictor(cfg.predictor, flag="--predictor")), None


def layer_paths(res: dict, dense_layers: list[int], breakeven: Optional[float]) -> list[dict]:
    """Per layer: which path ran as executed (sparse / mixed / dense) and why, with its times (medians, ms):
    attention (prediction included) and prediction of the every-layer-sparse run, and cuDNN's."""
    ph = res["per_head"]
    lm, lp = res.get("layer_ms", {}), res.get("layer_prediction_ms", {})
    key = "unguarded" if "unguarded" in lm else "sparse"
    out = []
    for i, dens in enumerate(ph["density"]):
        mean_d = statistics.fmean(dens)
        fb = ph["dense_fallback"][i]
        if i in dense_layers:
            path, why = "dense", "guard: prediction + sparse attention measured not faster than cuDNN"
        elif all(fb):
            path, why = "dense", f"predicted density {mean_d:.3f} above the kernel break-even {breakeven:.3f}"
        elif any(fb):
            path, why = "mixed", f"{sum(fb)} heads above the kernel break-even {breakeven:.3f}"
        elif breakeven is None:
            path, why = "sparse", "no break-even (CPU / fallback off)"
        else:
            path, why = "sparse", f"predicted density {mean_d:.3f} below the kernel break-even {breakeven:.3f}"
        row = {"layer": i, "path": path, "why": why, "density": mean_d, "recall_min_head": min(ph["recall"][i])}
        for name, src in (("attention_ms", lm.get(key, {})), ("prediction_ms", lp.get(key, {})),
                          ("cudnn_ms", lm.get("cudnn", {}))):
            if str(i) in src:
                row[name] = src[str(i)]
        if "attention_ms" in row and "prediction_ms" in row:
            row["kernel_ms"] = row["attention_ms"] - row["prediction_ms"]
        out.append(row)
    return out


def run_prefill(cfg: PrefillConfig, log: Optional[Callable[[str], None]] = None, hf: Any = None,
                ids: Optional[Tensor] = None, info: Optional[DistInfo] = None) -> dict:
    """Measure sparse prefill (see the package docstring); returns a JSON-friendly dict (the same on every rank
    under torchrun). ``hf`` / ``ids`` may pass an already loaded model and (windows, N) token ids."""
    info, device = _device(cfg, info)
    log = (log or (lambda s: None)) if info.is_main else (lambda s: None)
    cuda = device.type == "cuda"
    make_block_predictor(cfg.predictor, flag="--predictor")  # an unknown name fails before the model loads
    hf, ids, notices, n_pad = _inputs(cfg, hf, ids, info, device, log)
    predict, calib = _predictor(cfg, hf, info, log)
    be = _breakeven(cfg, hf, info, device, n_pad, log)
    kopts = _kernel_options(cfg, hf)
    threshold = None if be is None else be["breakeven"]
    from .window import layer_windows

    windows = layer_windows(hf.model.config, hf.n_layers)
    measure, dense, modes = _handlers(cfg, predict, threshold, cuda, kopts, windows)
    mine = shard_indices(ids.shape[0], info)
    t_warm = time.perf_counter()
    if cuda:  # compile and autotune every mode once on this rank's first window, outside the timed loop
        for _, h in [("measure", measure), *modes]:
            timed_forward(hf, h, ids[mine[0]: mine[0] + 1])
    warmup_s = time.perf_counter() - t_warm
    barrier(info)  # every rank starts the timed loop together (a rank's compile is setup, like loading the model)
    t_loop = time.perf_counter()
    per_window, timings, layer_times, layer_pred, dense_layers = _timed_windows(cfg, hf, ids, mine, measure, dense,
                                                                                modes, cuda, info, log)
    own_s = time.perf_counter() - t_loop  # this rank's windows, before waiting for the others
    per_window, timings, layer_times, layer_pred = _merge_ranks(per_window, timings, layer_times, layer_pred,
                                                                ids.shape[0], info)
    res = summarise(cfg, hf, per_window, timings, be, notices, str(device), n_pad)
    res["summary"]["dense_layers"] = dense_layers
    res["world_size"] = info.world_size
    # evaluation wall time (windows + merge; after the gather every rank has waited for the slowest one)
    res["seconds"] = round(time.perf_counter() - t_loop, 3)
    # where the time goes per rank: compile/autotune warm-up (untimed), own windows, and the rest of the timed
    # section (waiting for the slowest rank + gather)
    res["ranks"] = gather_lists([{"rank": info.rank, "windows": len(mine), "warmup_s": round(warmup_s, 3),
                                  "own_windows_s": round(own_s, 3)}], info, to_all=True)
    _describe(res, cfg, hf, cuda, measure, layer_times, layer_pred, dense_layers, threshold, calib, predict, kopts)
    return res


def _kernel_options(cfg: PrefillConfig, hf: Any) -> Optional[dict]:
    """FlexAttention kernel options for --kernel tuned (tuned for the head size), else None (the defaults)."""
    if cfg.kernel != "tuned":
        return None
    from ..flex import tuned_kernel_options

    return tuned_kernel_options(hf.head_dim)


def _timed_windows(cfg: PrefillConfig, hf: Any, ids: Tensor, mine: list, measure: Any, dense: Any, modes: list,
                   cuda: bool, info: DistInfo, log: Callable[[str], None]) -> tuple[list, dict, dict, dict, list]:
    """Time every mode on this rank's windows ``mine``: (per-window records, timings, per-layer times, per-layer
    prediction times, the layers the first-window guard sent to dense)."""
    sparse = modes[-1][1]
    guard = cuda and cfg.fallback
    per_window = []
    timings = {m: {"attention_ms": [], "forward_ms": [], "prediction_ms": [], "kernel_ms": []} for m, _ in modes}
    layer_times: dict[str, dict[int, list[float]]] = {m: {} for m, _ in modes}
    layer_pred: dict[str, dict[int, list[float]]] = {m: {} for m, _ in modes}
    dense_layers: list[int] = []
    for j, w in enumerate(mine):  # j: this rank's window count (the guard is decided on j == 0)
        x = ids[w: w + 1]
        logits, _, _ = timed_forward(hf, measure, x)
        loss_sparse = window_loss(logits, x)
        del logits
        losses = {}
        for name, h in modes:
            if name == "sparse" and guard and j == 0:
                dense_layers = _decide_dense_layers(layer_times, sparse, info, log)
            losses[name] = _time_mode(hf, h, x, cfg.reps, timings[name], layer_times[name], cuda, layer_pred[name])
        per_window.append(_window(w, measure, dense, losses, loss_sparse))
        ref = per_window[-1]
        log(f"window {w}: loss dense {ref['loss_dense']:.4f} sparse {loss_sparse:.4f} as executed "
            f"{losses['sparse']:.4f}")
    return per_window, timings, layer_times, layer_pred, dense_layers


def _describe(res: dict, cfg: PrefillConfig, hf: Any, cuda: bool, measure: Any, layer_times: dict, layer_pred: dict,
              dense_layers: list, threshold: Any, calib: Optional[dict], predict: Any, kopts: Optional[dict]) -> None:
    """Add per-layer medians, the path each layer took, the calibration, kernel options and sliding windows."""
    res["layer_ms"] = {m: {str(i): statistics.median(v) for i, v in d.items()} for m, d in layer_times.items()}
    res["layer_prediction_ms"] = {m: {str(i): statistics.median(v) for i, v in d.items()}
                                  for m, d in layer_pred.items() if d}
    res["layers"] = layer_paths(res, dense_layers, threshold)
    res["calibration"] = {"mode": "offline" if calib is not None else "online", **(calib or {}),
                          "recalibrations": list(getattr(predict, "recalibrations", []))}
    res["kernel_options"] = kopts
    res["remainder"] = cfg.remainder
    # per layer: the sliding window it ran with at this length (None: full causal), and the score softcap
    res["sliding_windows"] = [measure.layer_windows.get(i) for i in range(hf.n_layers)]
    if cuda and any(w is not None for w in res["sliding_windows"]):
        res["notices"].append("dense baseline of sliding-window layers: FlexAttention over every tile of the "
                              "window band ('flash'/'cudnn' rows are labels there, not those kernels)")
