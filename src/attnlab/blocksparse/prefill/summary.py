"""The prefill result: per-head grids, loss deltas, speed-ups (``_summary``) and the CLI's lines."""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict
from typing import Any, Optional

__all__ = ["format_summary", "spread", "summarise"]


def spread(xs: list[float]) -> dict[str, float]:
    """Median, min, max and count of timing samples."""
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def summarise(cfg: PrefillConfig, hf: Any, per_window: list[dict], timings: dict, be: Optional[dict],
             notices: list[str], device: str, n_pad: int) -> dict:
    """The JSON result of a prefill run from its per-window records and timing samples."""
    L, H = hf.n_layers, hf.n_heads

    def grid(key: str) -> list[list[float]]:  # layer x head, mean over windows
        acc = [[0.0] * H for _ in range(L)]
        for w in per_window:
            for rec in w["layers"]:
                for h in range(H):
                    acc[rec["layer"]][h] += rec[key][h] / len(per_window)
        return acc

    dens, rec, err = grid("density"), grid("recall"), grid("out_error")
    fb = [[any(bool(w["layers"][li]["dense_fallback"][h]) for w in per_window) for h in range(H)] for li in range(L)]
    # executed density: heads that fell back to dense compute every causal tile
    exe = [[1.0 if fb[li][h] else dens[li][h] for h in range(H)] for li in range(L)]
    deltas = [w["loss_delta"] for w in per_window]
    deltas_exe = [w["loss_delta_executed"] for w in per_window]
    flat = lambda m: [x for row in m for x in row]  # noqa: E731
    ts = {m: {k: spread(v) for k, v in d.items() if v} for m, d in timings.items()}
    speed = {}
    raw = "unguarded" if "unguarded" in ts else "sparse"
    for base in ("flash", "cudnn", "auto"):
        if base in ts and "sparse" in ts:
            speed[base] = {k: ts[base][k]["median"] / ts["sparse"][k]["median"] for k in ("attention_ms", "forward_ms")}
            # every layer sparse, prediction included / excluded (the pattern given: the kernel's gain, the
            # bound when the pattern is the oracle's)
            speed[base]["unguarded_attention"] = ts[base]["attention_ms"]["median"] / ts[raw]["attention_ms"]["median"]
            speed[base]["unguarded_forward"] = ts[base]["forward_ms"]["median"] / ts[raw]["forward_ms"]["median"]
            speed[base]["kernel_only"] = ts[base]["attention_ms"]["median"] / max(1e-9, ts[raw]["kernel_ms"]["median"])
    worst = min(flat(rec))
    return {
        "config": asdict(cfg), "model": hf.describe(), "device": device, "padded_len": n_pad,
        "notices": notices, "breakeven": be,
        "summary": {
            "recall_target": cfg.recall, "recall_min_head": worst, "recall_mean": statistics.fmean(flat(rec)),
            "recall_met_every_head": worst >= cfg.recall,
            "density_predicted_mean": statistics.fmean(flat(dens)), "density_executed_mean": statistics.fmean(flat(exe)),
            "dense_fallback_heads": sum(flat(fb)), "heads_total": L * H,
            "out_error_max": max(flat(err)), "out_error_mean": statistics.fmean(flat(err)),
            "loss_dense": statistics.fmean(w["loss_dense"] for w in per_window),
            "loss_sparse": statistics.fmean(w["loss_sparse"] for w in per_window),
            "loss_delta": statistics.fmean(deltas), "loss_delta_min": min(deltas), "loss_delta_max": max(deltas),
            "ppl_ratio": math.exp(statistics.fmean(deltas)),
            "loss_delta_executed": statistics.fmean(deltas_exe),
            "loss_delta_executed_range": [min(deltas_exe), max(deltas_exe)],
            "speedup": speed,
        },
        "per_head": {"density": dens, "recall": rec, "out_error": err, "dense_fallback": fb},
        "timings": ts, "windows": per_window,
    }


def format_summary(res: dict) -> str:
    """A few human-readable lines for the CLI."""
    s = res["summary"]
    lines = [f"model {res['model']['name']} N={res['config']['seq_len']} predictor={res['config']['predictor']} "
             f"p={s['recall_target']} device={res['device']}"]
    lines += [f"notice: {n}" for n in res["notices"]]
    lines.append(f"recall per head: min {s['recall_min_head']:.4f}, mean {s['recall_mean']:.4f} "
                 f"({'met' if s['recall_met_every_head'] else 'NOT met'} in every head)")
    sw = [w for w in res.get("sliding_windows", []) if w is not None]
    of = "causal tiles" if not sw else f"causal tiles; sliding-window layers: the window's tiles, window {max(sw)}"
    lines.append(f"density ({of}): predicted {s['density_predicted_mean']:.3f}, executed "
                 f"{s['density_executed_mean']:.3f}; dense fallback {s['dense_fallback_heads']}/{s['heads_total']} heads")
    lines.append(f"output error vs dense: mean {s['out_error_mean']:.2e}, max {s['out_error_max']:.2e}")
    lines.append(f"held-out loss: dense {s['loss_dense']:.4f}, every layer sparse {s['loss_sparse']:.4f} "
                 f"(delta {s['loss_delta']:+.4f}, ppl x{s['ppl_ratio']:.4f})")
    for base, sp in s["speedup"].items():
        lines.append(f"speed-up vs {base}: as executed: attention x{sp['attention_ms']:.2f}, whole forward "
                     f"x{sp['forward_ms']:.2f}; every layer sparse: attention x{sp['unguarded_attention']:.2f} "
                     f"(prediction included), x{sp['kernel_only']:.2f} (kernel alone)")
    if s.get("dense_layers"):
        lines.append(f"layers run dense (prediction + sparse attention measured slower than cuDNN): {s['dense_layers']}; "
                     f"loss delta as executed {s['loss_delta_executed']:+.4f}")
    li = res["per_head"]
    paths = {row["layer"]: row for row in res.get("layers", [])}
    for layer, (d, r) in enumerate(zip(li["density"], li["recall"])):
        lines.append(f"  layer {layer}: density " + " ".join(f"{x:.2f}" for x in d) + " | recall "
                     + " ".join(f"{x:.3f}" for x in r))
        row = paths.get(layer)
        if row:
            ms = ", ".join(f"{k.replace('_ms', '')} {row[k]:.2f} ms" for k in ("prediction_ms", "kernel_ms", "cudnn_ms")
                           if k in row)
            lines.append(f"    ran {row['path']} ({row['why']})" + (f"; {ms}" if ms else ""))
    return "\n".join(lines)
