"""Vertical-slash prediction cost: the eager torch statistics vs the fused Triton ones, against cuDNN attention.

One attention layer of the 8B-shaped geometry (32 query / 8 key heads of 128, causal, bf16) at each length:
the graphed :class:`~attnlab.blocksparse.kernels.vertical_slash.VerticalSlashPlan` (64 last queries, 64 recall-check
rows, the MInference defaults) with ``stats="eager"`` and ``stats="triton"``, and cuDNN causal SDPA of the same
layer (the attention the prediction is meant to save). Reported: median and IQR/2 of each (CUDA events, warm-up
excluded, two input sets alternated), prediction / cuDNN, and how far the two patterns agree (share of equal
tiles, max recall difference). Inputs are random (SYNTHETIC): the cost does not depend on the values; the pattern
agreement is only a consistency check (the trained-model figures come from ``benchmarks/prefill.py``).

``--quick``: CPU smoke run of the eager path at one short length (the triton path needs CUDA).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

from attnlab.blocksparse.blockmask import kv_to_block_graph  # noqa: E402
from attnlab.blocksparse.kernels.vertical_slash import VSParams, plan_for  # noqa: E402
from attnlab.blocksparse.predictors.core import sample_rows  # noqa: E402
from attnlab.timing import time_ms  # noqa: E402


def _stat(times: list[float]) -> tuple[float, float]:
    q = statistics.quantiles(times, n=4) if len(times) >= 4 else [min(times), 0, max(times)]
    return statistics.median(times), (q[2] - q[0]) / 2


def one_length(n: int, args, dev: torch.device, dtype: torch.dtype, backends: list[str]) -> dict:
    """Time each stats backend and cuDNN at length ``n``."""
    H, Hk, D, bs = args.heads, args.kv_heads, args.dim, args.block
    g = torch.Generator().manual_seed(n)
    sets = [((torch.randn(1, H, n, D, generator=g) * 1.5).to(dev, dtype),
             (torch.randn(1, Hk, n, D, generator=g) * 1.5).to(dev, dtype),
             (torch.randn(1, Hk, n, D, generator=g)).to(dev, dtype)) for _ in range(2)]
    rows = sample_rows(n, args.check_rows, 7, 1)
    knob = torch.full((H,), args.knob, device=dev)
    params = VSParams(block_size=bs)
    row: dict = {"n": n, "heads": H, "kv_heads": Hk, "d": D}
    results = {}
    for b in backends:
        plan = plan_for(sets[0][0], sets[0][1], D ** -0.5, rows, params, H // Hk, stats=b)
        turn = {"i": 0}

        def fn():  # alternate the two input sets
            q, k, _ = sets[turn["i"] % 2]
            turn["i"] += 1
            return plan.run(q, k, knob)
        med, iqr = _stat(time_ms(fn, dev, args.reps, 3))
        row[f"{b}_ms"], row[f"{b}_iqr"], row[f"{b}_graphed"] = med, iqr, plan.graphed
        results[b] = plan.run(sets[0][0], sets[0][1], knob)
        row[f"{b}_density"] = float(results[b].density.mean())
    if len(results) == 2:
        a, b = (kv_to_block_graph(r.kv) for r in results.values())
        row["tile_agreement"] = float((a == b).float().mean())
        ra, rb = (r.recall for r in results.values())
        row["recall_max_diff"] = float((ra - rb).abs().max())
    if dev.type == "cuda":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        turn = {"i": 0}

        def attn():
            q, k, v = sets[turn["i"] % 2]
            turn["i"] += 1
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        row["cudnn_ms"], row["cudnn_iqr"] = _stat(time_ms(attn, dev, args.reps, 3))
        for b in backends:
            row[f"{b}_vs_cudnn"] = row[f"{b}_ms"] / row["cudnn_ms"]
    return row


def fmt(r: dict, backends: list[str]) -> str:
    parts = [f"N={r['n']:6d}"]
    for b in backends:
        parts.append(f"{b} {r[f'{b}_ms']:.3f} ± {r[f'{b}_iqr']:.3f} ms" + (f" ({100 * r[f'{b}_vs_cudnn']:.0f}% of cuDNN)"
                                                                          if "cudnn_ms" in r else ""))
    if "cudnn_ms" in r:
        parts.append(f"cuDNN {r['cudnn_ms']:.3f} ms")
    if "tile_agreement" in r:
        parts.append(f"tiles agree {r['tile_agreement']:.4f}, recall diff {r['recall_max_diff']:.1e}")
    return " | ".join(parts)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", default="16384,32768,65536,131072")
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--block", type=int, default=128)
    ap.add_argument("--check-rows", type=int, default=64)
    ap.add_argument("--knob", type=float, default=1.0, help="per-head knob (scale on vertical/slash sizes)")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--backends", default="eager,triton")
    ap.add_argument("--quick", action="store_true", help="CPU smoke run (eager only, one short length)")
    ap.add_argument("--out", default="results/vertical_slash.json")
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.quick
    dev = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    backends = args.backends.split(",") if cuda else ["eager"]
    lengths = [int(x) for x in args.lengths.split(",")] if not args.quick else [1024]
    if args.quick:
        args.heads, args.kv_heads, args.dim, args.reps = 4, 2, 16, 2
    print(f"device {torch.cuda.get_device_name() if cuda else 'cpu'}; {args.heads} q / {args.kv_heads} kv heads, "
          f"d={args.dim}, block {args.block}, {dtype}; SYNTHETIC inputs", flush=True)
    rows = []
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for n in lengths:
        rows.append(one_length(n, args, dev, dtype, backends))
        print(fmt(rows[-1], backends), flush=True)
        out.write_text(json.dumps({"rows": rows, "partial": True}, indent=1))
        if cuda:
            torch.cuda.empty_cache()
    res = {"rows": rows, "device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
           "args": vars(args), "inputs": "synthetic"}
    out.write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
