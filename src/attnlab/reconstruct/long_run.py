"""One long-context study per length (:func:`study_length`) and the `attnlab reconstruct long` run (:func:`run_long`):
row spectrum on fit windows, TV-vs-total-compute frontier on held-out windows, memory measured and stated.
The chunked machinery and its memory formulas are in :mod:`.long`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from ..errors import ConfigError
from .long import (
    EVAL_BASE,
    EVAL_PER_RANK,
    FAMILIES,
    LEVELS,
    SPEC_BUFFERS,
    best_at,
    capture_qk,
    costed_only,
    eval_peak_bytes,
    evaluate_head,
    fit_proxy,
    head_spectrum,
    points_for,
    sample_rows,
    spectrum_peak_bytes,
    spectrum_summary,
    summarise,
)


@dataclass
class LongConfig:
    """Settings of one long-context study (per length)."""

    n_fit: int = 2  # fit windows (proxy moments, spectrum rows)
    n_eval: int = 4  # held-out windows (the spread of every number is across them)
    eval_rows: int = 1024  # held-out query positions per window (all rows when >= N)
    spectrum_rows: int = 2048  # fit rows sampled for the row spectrum (R)
    chunk_rows: int = 256  # query rows per evaluation chunk (c)
    key_chunk: int = 4096  # keys per spectrum tile (kc)
    fractions: tuple = (1 / 64, 1 / 32, 1 / 16, 1 / 8, 3 / 16, 1 / 4)
    ranks: tuple = (1, 2, 4, 8)
    families: tuple = tuple(FAMILIES)
    max_compute: float = 0.6  # points costing more (causal total) are listed, not evaluated (oracle always runs)
    target_compute: float = 0.30
    target_tv: float = 0.05
    layers: Optional[list] = None
    heads: Optional[list] = None
    device: str = "cpu"
    dtype: str = "float32"  # float64 for CPU checks
    seed: int = 0

    def validate(self) -> None:
        """Raise ConfigError on bad values."""
        for name in ("n_fit", "n_eval", "eval_rows", "spectrum_rows", "chunk_rows", "key_chunk"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1 (got {getattr(self, name)})")
        if self.n_eval < 2:
            raise ConfigError("--n-eval must be >= 2 (the spread is across held-out windows)")
        if self.dtype not in ("float32", "float64"):
            raise ConfigError(f"--dtype must be float32 or float64 (got {self.dtype!r})")
        for f in self.fractions:
            if not 0.0 < f <= 1.0:
                raise ConfigError(f"--fractions: {f} is not in (0, 1]")


def study_length(hf, fit_windows: torch.Tensor, eval_windows: torch.Tensor, cfg: LongConfig,
                 log: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Row spectrum (k90/95/99 per head, fit windows) and the TV-vs-total-compute frontier (held-out windows)."""
    import time

    n = _check_inputs(hf, fit_windows, eval_windows, cfg)
    dtype = getattr(torch, cfg.dtype)
    dev = torch.device(cfg.device)
    layers = list(range(hf.n_layers)) if cfg.layers is None else list(cfg.layers)
    t0 = time.perf_counter()
    fit = capture_qk(hf, fit_windows, layers, dev, dtype)
    ev = capture_qk(hf, eval_windows, layers, dev, dtype)
    _, H, _, d = ev.shape
    heads = list(range(H)) if cfg.heads is None else list(cfg.heads)
    t_cap = time.perf_counter() - t0
    pts, skipped = points_for(cfg.families, cfg.fractions, cfg.ranks, n, d, cfg.max_compute)
    spec_rows = sample_rows(n, cfg.spectrum_rows, len(fit_windows), cfg.seed)
    eval_rows = sample_rows(n, cfg.eval_rows, 1, cfg.seed + 1)
    ranks = sorted({p.rank for p in pts if p.rank})
    spectra, tv = {}, {}
    peak_eval, peak_spec = 0, 0
    t_spec = t_eval = 0.0
    for l in layers:
        for h in heads:
            qf, kf = fit.q[l][:, h], fit.k[l][:, h]
            t1 = time.perf_counter()
            ev_, peak = _measured(dev, lambda: head_spectrum(qf, kf, spec_rows, fit.scaling, cfg.key_chunk))
            peak_spec = max(peak_spec, peak)
            spectra[f"{l}.{h}"] = spectrum_summary(ev_, sum(len(r) for r in spec_rows))
            t2 = time.perf_counter()
            proxies = {r: fit_proxy(qf, kf, r, seed=cfg.seed + 1000 * l + h) for r in ranks}
            tv[(l, h)], peak = _measured(dev, lambda: evaluate_head(ev.q[l][:, h], ev.k[l][:, h], eval_rows,
                                                                    ev.scaling, pts, proxies, cfg.chunk_rows))
            peak_eval = max(peak_eval, peak)
            t_spec += t2 - t1
            t_eval += time.perf_counter() - t2
        log(f"N={n}: layer {l} done ({time.perf_counter() - t0:.1f} s)")
    front = summarise(tv, layers, heads, pts, n, d)
    best = best_at(front, cfg.target_compute)
    per_layer_k = {str(l): {f"k{round(v * 100)}": sum(spectra[f'{l}.{h}'][f'k{round(v * 100)}'] for h in heads) / len(heads)
                            for v in LEVELS} for l in layers}
    R = sum(len(r) for r in spec_rows)
    res: dict[str, Any] = {
        "seq_len": n, "n_fit": len(fit_windows), "n_eval": len(eval_windows), "eval_rows_per_window": len(eval_rows[0]),
        "spectrum_rows": R, "layers": layers, "heads": heads, "d_head": d, "dtype": cfg.dtype,
        "spectrum": spectra, "spectrum_per_layer": per_layer_k, "frontier": front, "skipped": skipped,
        "costed_only": costed_only(n, d, spectra, cfg.fractions, cfg.ranks),
        "best_at_target": best, "target": {"tv": cfg.target_tv, "compute": cfg.target_compute},
        "memory": _memory(cfg, dev, len(eval_windows), len(fit_windows), len(eval_rows[0]), R, n, d, len(ranks),
                          peak_eval, peak_spec),
        "seconds": {"capture": round(t_cap, 2), "spectrum": round(t_spec, 2), "frontier": round(t_eval, 2)},
    }
    _add_best(res, front, best, cfg)
    return res


def _check_inputs(hf, fit_windows: torch.Tensor, eval_windows: torch.Tensor, cfg: LongConfig) -> int:
    """The window length, after checking the settings, that the model is causal and both splits share a length."""
    cfg.validate()
    if not getattr(hf, "causal", True):
        raise ConfigError("the long-context study needs a causal LM (this model is bidirectional)")
    n = int(eval_windows.shape[1])
    if int(fit_windows.shape[1]) != n:
        raise ConfigError("fit and held-out windows must have the same length")
    return n


def _measured(dev: torch.device, fn: Callable[[], Any]) -> tuple[Any, int]:
    """``fn()`` and the peak CUDA memory it allocated beyond what was already allocated (0 off CUDA)."""
    if dev.type != "cuda":
        return fn(), 0
    base = torch.cuda.memory_allocated(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    out = fn()
    torch.cuda.synchronize(dev)
    return out, torch.cuda.max_memory_allocated(dev) - base


def _memory(cfg: LongConfig, dev: torch.device, B: int, W: int, rows: int, R: int, n: int, d: int, n_ranks: int,
            peak_eval: int, peak_spec: int) -> dict[str, Any]:
    """The memory formulas of the evaluation and the spectrum, their values here, and the measured peaks (CUDA)."""
    cuda = dev.type == "cuda"
    c = min(cfg.chunk_rows, rows)
    item = torch.empty(0, dtype=getattr(torch, cfg.dtype)).element_size()
    return {"eval_formula": f"({EVAL_BASE} + {EVAL_PER_RANK} * n_ranks) * B * c * N * {item} bytes per head",
            "eval_formula_bytes": eval_peak_bytes(B, c, n, item, n_ranks),
            "spectrum_formula": f"(3 R^2 + {SPEC_BUFFERS} * R * kc + W N d) * {item} bytes per head",
            "spectrum_formula_bytes": spectrum_peak_bytes(R, min(cfg.key_chunk, n), item, W, n, d),
            "dense_scores_per_head_bytes": B * n * n * item,
            "corpus_path_statistics_per_head_bytes": 2 * 8 * n * n,
            "measured_eval_peak_bytes": peak_eval if cuda else None,
            "measured_spectrum_peak_bytes": peak_spec if cuda else None,
            "chunk_rows": c, "key_chunk": min(cfg.key_chunk, n)}


def _add_best(res: dict[str, Any], front: dict[str, Any], best: Optional[str], cfg: LongConfig) -> None:
    """The best point at the target compute (and whether it meets the target TV), and the cheapest point that
    reaches the target TV (pooled) whatever its compute."""
    if best is not None:
        b = front[best]
        res["best"] = {"label": best, "compute": b["compute"], "worst_layer_tv_pooled": b["worst_layer_tv_pooled"],
                       "worst_layer_tv": b["worst_layer_tv"]}
        res["meets_target"] = b["worst_layer_tv"]["max"] <= cfg.target_tv
        res["meets_target_pooled"] = b["worst_layer_tv_pooled"] <= cfg.target_tv
    ok = {k: v for k, v in front.items() if v["worst_layer_tv_pooled"] <= cfg.target_tv and v["family"] != "oracle-none"}
    res["cheapest_at_target_tv"] = (min(ok, key=lambda k: ok[k]["compute"]) if ok else None)


def format_length(res: dict[str, Any]) -> str:
    """Plain-text table of one length: Pareto points per family and the spectrum per layer."""
    n = res["seq_len"]
    lines = [f"N = {n}: {res['n_eval']} held-out windows x {res['eval_rows_per_window']} rows, "
             f"spectrum from {res['spectrum_rows']} fit rows"]
    lines.append("  row spectrum per layer (mean over heads): " + "; ".join(
        f"L{l} k90 {v['k90']:.0f} k95 {v['k95']:.0f} k99 {v['k99']:.0f}" for l, v in res["spectrum_per_layer"].items()))
    head = f"  {'point':34s} {'compute':>7s}  {'worst-layer TV: mean ± sd [min, max] over windows':>50s}  pooled"
    lines += [head, "  " + "-" * (len(head) - 2)]
    fam: dict[str, list] = {}
    for lab, v in res["frontier"].items():
        fam.setdefault(v["family"], []).append((v["compute"], lab, v))
    for f, pts in fam.items():
        best = float("inf")
        for comp, lab, v in sorted(pts, key=lambda t: (t[0], t[2]["worst_layer_tv_pooled"])):
            if v["worst_layer_tv_pooled"] >= best:
                continue
            best = v["worst_layer_tv_pooled"]
            w = v["worst_layer_tv"]
            lines.append(f"  {lab:34s} {comp:7.3f}  {w['mean']:.4f} ± {w['sd']:.4f} [{w['min']:.4f}, {w['max']:.4f}]"
                         f"{'':16s}  {v['worst_layer_tv_pooled']:.4f}")
    b = res.get("best")
    lines.append(f"  best at compute <= {res['target']['compute']}: " + (
        "none" if b is None else f"{b['label']} (compute {b['compute']:.3f}): worst-layer TV {b['worst_layer_tv_pooled']:.4f}"
        f" pooled, {b['worst_layer_tv']['mean']:.4f} ± {b['worst_layer_tv']['sd']:.4f} over windows; "
        f"meets {res['target']['tv']}: {res.get('meets_target')}"))
    lines.append("  costed only: " + "; ".join(f"{k} >= {v['compute']:.2f}" for k, v in res["costed_only"].items()))
    return "\n".join(lines)


SECTION = "reconstruct_long"


def long_windows(hf, model: str, n: int, n_fit: int, n_eval: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Fit windows (training documents) and held-out windows (held-out documents) of length ``n``: the byte corpus
    of `attnlab lm train` for its models, else the corpus splits of :func:`attnlab.reconstruct.fit.windows_for`."""
    from ..lm.train import read_meta

    if read_meta(model) is not None:
        from ..lm.data import load_corpus, windows

        meta = read_meta(model) or {}
        corpus = load_corpus((meta.get("config") or {}).get("corpus"), 0.05, None, min_heldout_tokens=2 * n)
        return (windows(corpus.train, n, n_fit, torch.Generator().manual_seed(seed + n)),
                windows(corpus.heldout, n, n_eval, contiguous=True))
    from .fit import windows_for

    return (windows_for(hf.tokenizer, n, n_fit, "fit", None, seed),
            windows_for(hf.tokenizer, n, n_eval, "heldout", None, seed + 1, flag="--n-eval", minimum=2))


def run_long(out, model: str, lengths: list[int], log: Callable[[str], None] = lambda s: None,
             **settings: Any) -> dict[str, Any]:
    """`attnlab reconstruct long`: :func:`study_length` at every length; writes section 'reconstruct_long'."""
    from ..io import RunDir
    from ..sources.hf import load_model

    cfg = LongConfig(**settings)
    cfg.validate()
    if not lengths or any(int(n) < 2 for n in lengths):
        raise ConfigError(f"--lengths must be a list of lengths >= 2 (got {lengths})")
    hf = load_model(model, device=cfg.device)
    if max(lengths) > hf.max_len:
        raise ConfigError(f"--lengths {max(lengths)} exceeds the model's maximum of {hf.max_len} positions")
    res: dict[str, Any] = {"model": model, "config": {k: (list(v) if isinstance(v, tuple) else v)
                                                      for k, v in cfg.__dict__.items()}, "lengths": {}}
    for n in lengths:
        fit_w, ev_w = long_windows(hf, model, int(n), cfg.n_fit, cfg.n_eval, cfg.seed)
        r = study_length(hf, fit_w, ev_w, cfg, log=log)
        res["lengths"][str(n)] = r
        log(format_length(r))
    run = RunDir(out)
    run.write_section(SECTION, res)
    return res
