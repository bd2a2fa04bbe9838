"""Capture + streaming statistics vs the naive `output_attentions=True` route on MiniLM.

Both routes compute the same per-(layer, head) row covariance of row-centred pre-softmax scores (the
naive route recovers them as log-probabilities, which differ from the scores by a per-row constant).
  naive: eager attention with output_attentions=True (every layer x head x N^2 probability tensor is
         materialised), then per-head float64 accumulation of X^T X and sums, as user code would do.
  ours:  SDPA forward, our AttentionInterface hook scores a chunk of heads at a time, grouped float64
         Chan updates on the compute device.
Each route runs in a fresh subprocess so that peak memory is its own. Prints a table, writes JSON.

  python benchmarks/capture.py [--device cuda] [--n-sequences 64] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _peak_bytes(device: str) -> int:
    import torch

    if device.startswith("cuda"):
        return int(torch.cuda.max_memory_allocated())
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def worker(route: str, device: str, n_seq: int, seq_len: int, batch: int, layers: int, sketch: int,
           model: str = "minilm") -> dict:
    """Run one route in this process and return its measurements."""
    import torch

    from attnlab.capture.corpus import select_windows
    from attnlab.capture.hf import load_model, run_forward
    from attnlab.capture.run import stream_attention
    from attnlab.spectral.collector import SpectrumCollector
    from attnlab.spectral.stats import row_centre

    torch.manual_seed(0)
    hf = load_model(model, device=device)
    windows = select_windows(hf.tokenizer, seq_len, None, n_seq, "fit", 0)
    H, L = hf.n_heads, list(range(layers))
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    # warm-up on one batch, then reset the peak counters
    run_forward(hf, windows[:batch])
    sync()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        base = int(torch.cuda.memory_allocated())
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    if route == "ours":
        col = SpectrumCollector(L, list(range(H)), seq_len, sketch_size=sketch, device=device)
        stream_attention(hf, windows, col, L, batch, show_progress=False)
        sync()
        check = float(col.rows[L[-1]].covariance()[0].trace())
    else:
        import numpy as np

        hf.model.set_attn_implementation("eager")
        sums = {(l, h): np.zeros(seq_len) for l in L for h in range(H)}
        outer = {(l, h): np.zeros((seq_len, seq_len)) for l in L for h in range(H)}
        n = 0
        for ids in windows.split(batch):
            out = run_forward(hf, ids, output_attentions=True)
            for l in L:
                logp = torch.log(out.attentions[l].double().clamp_min(1e-300))
                s = row_centre(logp, None).cpu().numpy()  # (B, H, N, N)
                for h in range(H):
                    x = s[:, h].reshape(-1, seq_len)
                    sums[(l, h)] += x.sum(0)
                    outer[(l, h)] += x.T @ x
            n += ids.numel()
        mean = sums[(L[-1], 0)] / n
        check = float(np.trace(outer[(L[-1], 0)] / n - np.outer(mean, mean)) * n / (n - 1))
    elapsed = time.perf_counter() - t0
    peak = _peak_bytes(device) - base
    return {"route": route, "tokens_per_s": windows.numel() / elapsed, "seconds": elapsed,
            "peak_extra_mib": peak / 2**20, "layers": layers, "trace_check": check}


def run_sub(args, route: str, layers: int) -> dict:
    """Run ``worker`` in a fresh subprocess (own peak memory)."""
    cmd = [sys.executable, __file__, "--worker", route, "--layers", str(layers), "--device", args.device,
           "--n-sequences", str(args.n_sequences), "--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size),
           "--sketch-size", str(args.sketch_size), "--model", args.model]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if out.returncode:
        raise SystemExit(f"{route} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--n-sequences", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--sketch-size", type=int, default=0, help="full-matrix sketch in our route (0 = rows only, "
                                                                  "like the naive route)")
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--model", default="minilm", help="model to load (a local copy of MiniLM on the GPU machine)")
    p.add_argument("--out", default=str(ROOT / "results" / "capture.json"))
    p.add_argument("--worker", choices=["ours", "naive"])
    args = p.parse_args()
    if args.quick:
        args.n_sequences, args.seq_len = 8, 64
    if args.worker:
        print(json.dumps(worker(args.worker, args.device, args.n_sequences, args.seq_len, args.batch_size,
                                args.layers, args.sketch_size, args.model)))
        return
    rows = [run_sub(args, "naive", 6), run_sub(args, "ours", 6), run_sub(args, "naive", 2), run_sub(args, "ours", 2)]
    rel = abs(rows[0]["trace_check"] - rows[1]["trace_check"]) / abs(rows[0]["trace_check"])
    print(f"{args.model}, {args.n_sequences} x {args.seq_len} tokens, batch {args.batch_size}, device {args.device}")
    print(f"{'route':8} {'layers':>6} {'tokens/s':>10} {'peak extra MiB':>15}")
    for r in rows:
        print(f"{r['route']:8} {r['layers']:>6} {r['tokens_per_s']:>10.0f} {r['peak_extra_mib']:>15.1f}")
    summary = {
        "throughput_ratio_6_layers": rows[1]["tokens_per_s"] / rows[0]["tokens_per_s"],
        "memory_ratio_6_layers": rows[0]["peak_extra_mib"] / max(rows[1]["peak_extra_mib"], 1e-9),
        "ours_memory_6_over_2_layers": rows[1]["peak_extra_mib"] / max(rows[3]["peak_extra_mib"], 1e-9),
        "naive_memory_6_over_2_layers": rows[0]["peak_extra_mib"] / max(rows[2]["peak_extra_mib"], 1e-9),
        "statistics_rel_diff": rel,
    }
    for k, v in summary.items():
        print(f"{k}: {v:.3g}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "rows": rows, "summary": summary}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
