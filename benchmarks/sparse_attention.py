"""Predicted block-sparse attention (FlexAttention) vs dense SDPA (FlashAttention backend).

For each input case and length N: dense SDPA wall time; for each block predictor: prediction + BlockMask
build time, FlexAttention time with the prebuilt mask, and the whole pipeline (prediction + mask + permute +
attention) timed end to end; achieved recall against exact dense attention (softmax mass inside the kept
pairs and top-64-key recall, on 256 sampled query rows per head); output error ||o - o_dense|| / ||o_dense||
(o_dense = the SDPA output in the same dtype). Timing: warm-up, CUDA events, median of ``--reps`` runs.

Input cases (no real model is available at these lengths on the GPU box, so q/k are synthesised):

* ``random``: i.i.d. N(0, 1) q, k, v. Attention is nearly uniform, so recall ~= density for every
  predictor: the honest worst case, where block sparsity cannot be both accurate and fast.
* ``structured``: planted structure resembling real heads. Dims split in two halves: a positional half
  (a smooth random process over positions, Gaussian low-pass of white noise with a per-head length scale
  16-256 tokens, shared by q and k: gives a local band) and a content half (a per-token topic vector;
  documents are segments of geometric length, mean 384 tokens, each with one of 32 topics that recur
  along the sequence: gives long-range same-topic blocks), plus attention-sink keys at positions 0-3 on
  some heads. Per-head weights cycle through local / topic / mixed / sink+local heads. Peak logits ~10.
* ``interleaved``: like ``structured`` but the topic changes every token (content-only heads): tiles in
  the original order are all mixed, so only the clustering predictor (sort by cluster) can find sparsity.

``--quick`` runs tiny sizes on the CPU (dense fallback path) as a smoke test.

Run on the GPU box: ``PYTHONPATH=src python3 benchmarks/sparse_attention.py --out $OUT/sparse.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from typing import Any, Callable

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

from attnlab.io import write_json  # noqa: E402
from attnlab.timing import time_ms  # noqa: E402
from attnlab.blocksparse.predictors.cluster import ClusterBlockPredictor  # noqa: E402
from attnlab.blocksparse.predictors.pooled import PooledBudgetPredictor  # noqa: E402
from attnlab.blocksparse.blockmask import BlockPattern, KVBlocks  # noqa: E402
from attnlab.blocksparse.flex import (  # noqa: E402
    dense_attention_sdpa,
    mass_recall,
    masked_rows_reference,
    relative_error,
    run_pattern,
)

# --------------------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------------------

HEAD_TYPES = [  # (positional peak logit, topic peak logit, sink logit)
    (10.0, 2.0, 0.0),  # local
    (3.0, 9.0, 0.0),  # topic
    (7.0, 7.0, 0.0),  # mixed
    (8.0, 2.0, 9.0),  # sink + local
]
LENGTH_SCALES = [16, 64, 256, 32, 128]


def _smooth_process(B: int, H: int, N: int, m: int, ell: list[float], gen: torch.Generator,
                    device: torch.device) -> torch.Tensor:
    """Gaussian-low-pass white noise along N, rows scaled to norm sqrt(m): (B, H, N, m) float32."""
    x = torch.randn(B, H, N, m, generator=gen, device=device)
    f = torch.fft.rfftfreq(N, device=device)  # cycles per token
    ell_t = torch.tensor(ell, device=device).view(1, H, 1, 1)
    filt = torch.exp(-0.5 * (2 * math.pi * f.view(1, 1, -1, 1) * ell_t) ** 2)
    y = torch.fft.irfft(torch.fft.rfft(x, dim=2) * filt, n=N, dim=2)
    return torch.nn.functional.normalize(y, dim=-1) * math.sqrt(m)


def make_inputs(case: str, B: int, H: int, N: int, D: int, dtype: torch.dtype, device: torch.device,
                seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v (B, H, N, D) for the named case (see module docstring)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    v = torch.randn(B, H, N, D, generator=gen, device=device)
    if case == "random":
        q = torch.randn(B, H, N, D, generator=gen, device=device)
        k = torch.randn(B, H, N, D, generator=gen, device=device)
        return q.to(dtype), k.to(dtype), v.to(dtype)
    if case not in ("structured", "interleaved"):
        raise ValueError(f"unknown case {case!r}")
    m = D // 2
    c = D - m
    sq = math.sqrt(D)
    ell = [LENGTH_SCALES[h % len(LENGTH_SCALES)] for h in range(H)]
    pos = _smooth_process(B, H, N, m, ell, gen, device)
    n_topics = 32
    topics = torch.nn.functional.normalize(torch.randn(n_topics, c, generator=gen, device=device), dim=-1)
    topics = topics * math.sqrt(c)
    if case == "structured":
        # segments of geometric length (mean 384) with a random topic each
        p_new = 1.0 / 384
        starts = torch.rand(B, N, generator=gen, device=device) < p_new
        starts[:, 0] = True
        seg = torch.cumsum(starts.long(), dim=1) - 1
        seg_topic = torch.randint(0, n_topics, (B, N), generator=gen, device=device)
        tid = torch.gather(seg_topic, 1, seg)
    else:
        tid = torch.randint(0, n_topics, (B, N), generator=gen, device=device)
    content = topics[tid].unsqueeze(1)  # (B, 1, N, c)
    types = HEAD_TYPES if case == "structured" else [(1.0, 10.0, 0.0), (2.0, 9.0, 0.0)]
    w = torch.tensor([types[h % len(types)] for h in range(H)], device=device)  # (H, 3)
    a_pos = (w[:, 0] * sq / m).sqrt().view(1, H, 1, 1)
    a_top = (w[:, 1] * sq / c).sqrt().view(1, H, 1, 1)
    noise = 0.3
    qc = content + noise * torch.randn(B, H, N, c, generator=gen, device=device)
    kc = content + noise * torch.randn(B, H, N, c, generator=gen, device=device)
    q = torch.cat([a_pos * pos, a_top * qc], dim=-1)
    k = torch.cat([a_pos * pos, a_top * kc], dim=-1)
    # attention sinks: keys 0..3 get a large component along a direction every query shares
    s_dir = torch.nn.functional.normalize(torch.randn(H, D, generator=gen, device=device), dim=-1)
    sink = w[:, 2].view(1, H, 1, 1)
    q = q + (sink > 0) * 2.0 * s_dir.view(1, H, 1, D)
    k[:, :, :4] = k[:, :, :4] + sink * sq / 2.0 * s_dir.view(1, H, 1, D)
    return q.to(dtype), k.to(dtype), v.to(dtype)


# --------------------------------------------------------------------------------------------------
# timing
# --------------------------------------------------------------------------------------------------


def time_fn(fn: Callable[[], Any], device: torch.device, reps: int, warmup: int) -> float:
    """Median milliseconds of ``fn`` (CUDA events on GPU, perf_counter on CPU) after ``warmup`` calls."""
    return statistics.median(time_ms(fn, device, reps, warmup))


def full_pattern(B: int, H: int, nb: int, block_size: int, device: torch.device) -> BlockPattern:
    """Every tile kept (non-causal): measures FlexAttention's own overhead against SDPA."""
    idx = torch.arange(nb, dtype=torch.int32, device=device).expand(B, H, nb, nb).contiguous()
    cnt = torch.full((B, H, nb), nb, dtype=torch.int32, device=device)
    z = torch.zeros_like(cnt)
    return BlockPattern(KVBlocks(z, torch.zeros_like(idx), cnt, idx), block_size, False)


def predictors(quick: bool) -> dict[str, Callable[[], Any]]:
    """The configurations benchmarked (fresh instances: nothing is fitted on other data)."""
    cap = 0.25
    return {
        "pooled_b10": lambda: PooledBudgetPredictor(budget=0.10, pool=32),
        "pooled_b10c": lambda: PooledBudgetPredictor(budget=0.10, pool=32, compile=True),
        "pooled_m95c": lambda: PooledBudgetPredictor(budget=cap, mass=0.95, pool=32, compile=True),
        "pooled_m98c": lambda: PooledBudgetPredictor(budget=cap, mass=0.98, pool=32, compile=True),
        "pooled_m95": lambda: PooledBudgetPredictor(budget=cap, mass=0.95, pool=32),
        "pooled_m98": lambda: PooledBudgetPredictor(budget=cap, mass=0.98, pool=32),
        "cluster16": lambda: ClusterBlockPredictor(
            n_clusters=16, iters=4, inner=PooledBudgetPredictor(budget=0.05, pool=32, sink_blocks=0)),
    }


# --------------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ns", default="32768,65536,16384,8192,4096", help="run in this order (target first)")
    ap.add_argument("--cases", default="structured,interleaved,random")
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--block", type=int, default=128)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--predictors", default="", help="comma list (default: all)")
    ap.add_argument("--causal-ns", default="32768", help="N values also run causal (structured case only)")
    ap.add_argument("--extra-ns", default="32768", help="N values with flex at full density + kernel options")
    ap.add_argument("--time-limit", type=float, default=480.0, help="stop starting new work after this (s)")
    ap.add_argument("--out", default="results/sparse_attention.json")
    ap.add_argument("--quick", action="store_true", help="tiny CPU smoke test")
    ap.add_argument("--cudnn", type=int, default=1, help="also time SDPA's cuDNN backend (GPU)")
    ap.add_argument("--cases-at", default="", help="e.g. 'interleaved:32768+65536;random:32768' limits cases to N")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    t_start = time.time()
    if args.quick:
        device = torch.device("cpu")
        ns, H, D, bs, dtype = [512], 2, 32, 64, torch.float32
        args.reps, args.warmup, args.causal_ns, args.extra_ns = 2, 1, "512", "512"
    else:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        ns, H, D, bs = [int(x) for x in args.ns.split(",")], args.heads, args.dim, args.block
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    causal_ns = {int(x) for x in args.causal_ns.split(",") if x}
    extra_ns = {int(x) for x in args.extra_ns.split(",") if x}
    preds = predictors(args.quick)
    if args.predictors:
        preds = {k: v for k, v in preds.items() if k in args.predictors.split(",")}
    meta = {
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "B": 1, "H": H, "D": D, "block_size": bs, "dtype": str(dtype), "reps": args.reps,
        "recall_rows": 256, "note": "times in ms, CUDA-event medians; total = prediction + mask + attention",
    }
    print(json.dumps(meta), flush=True)
    rows: list[dict[str, Any]] = []
    skipped: list[str] = []

    def save() -> None:
        # atomic, and NaN (e.g. no cuDNN timing on CPU) becomes null so the file stays valid JSON
        write_json(args.out, {"meta": meta, "rows": rows, "skipped": skipped})

    limits = {c.split(":")[0]: {int(x) for x in c.split(":")[1].split("+")}
              for c in args.cases_at.split(";") if c}
    jobs = []
    for n in ns:  # in the given order (target N first), the causal run right after its N
        jobs += [(n, case, False) for case in args.cases.split(",") if n in limits.get(case, {n})]
        jobs += [(n, "structured", True)] if n in causal_ns else []
    for n, case, causal in jobs:
        if time.time() - t_start > args.time_limit:
            skipped.append(f"N={n} {case} causal={causal}: time limit")
            print(f"SKIP N={n} {case} causal={causal} (time limit)", flush=True)
            continue
        try:
            q, k, v = make_inputs(case, 1, H, n, D, dtype, device, args.seed)
            o_dense = dense_attention_sdpa(q, k, v, causal=causal)
            t_dense = time_fn(lambda: dense_attention_sdpa(q, k, v, causal=causal), device, args.reps, args.warmup)
            t_cudnn = float("nan")
            if device.type == "cuda" and args.cudnn:
                try:  # the strongest dense baseline we have (cuDNN attention), for honesty
                    from torch.nn.attention import SDPBackend, sdpa_kernel

                    def cudnn() -> torch.Tensor:
                        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)

                    err_cudnn = relative_error(cudnn(), o_dense)
                    t_cudnn = time_fn(cudnn, device, args.reps, args.warmup) if err_cudnn < 2e-2 else float("nan")
                except Exception as e:
                    print(f"cudnn baseline unavailable: {type(e).__name__}: {str(e)[:120]}", flush=True)
            base = {"N": n, "case": case, "causal": causal, "dense_ms": t_dense, "dense_cudnn_ms": t_cudnn}
            print(f"N={n} {case} causal={causal}: SDPA flash {t_dense:.2f} ms, cuDNN {t_cudnn:.2f} ms", flush=True)
            configs: list[tuple[str, Callable[[], Any], dict | None]] = [(name, f, None) for name, f in preds.items()]
            if n in extra_ns and not causal and case == "structured":
                configs.append(("full_density", lambda: None, None))
                configs.append(("pooled_b10_k128", preds.get("pooled_b10", lambda: PooledBudgetPredictor()),
                                {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 2}))
            for name, make, kopts in configs:
                if time.time() - t_start > args.time_limit:
                    skipped.append(f"N={n} {case} causal={causal} {name}: time limit")
                    continue
                try:
                    pred = make()
                    if name == "full_density":
                        def predict() -> BlockPattern:
                            return full_pattern(1, H, n // bs, bs, device)
                    else:
                        def predict(pred: Any = pred) -> BlockPattern:
                            return pred.predict_blocks(q, k, bs, causal)

                    pat = predict()
                    bm = pat.block_mask() if device.type == "cuda" else None
                    t0 = time.perf_counter()
                    out = run_pattern(q, k, v, pat, block_mask=bm, kernel_options=kopts)
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                        bm = pat.block_mask()
                    first_call_s = time.perf_counter() - t0
                    t_pred = time_fn(lambda: (predict().block_mask() if device.type == "cuda" else predict()),
                                     device, args.reps, 1)
                    t_attn = time_fn(lambda: run_pattern(q, k, v, pat, block_mask=bm, kernel_options=kopts),
                                     device, args.reps, args.warmup)

                    def total() -> torch.Tensor:
                        p = predict()
                        return run_pattern(q, k, v, p, kernel_options=kopts)

                    t_total = time_fn(total, device, args.reps, args.warmup)
                    rec = mass_recall(q, k, pat, rows=256, seed=args.seed)
                    # exactness of the executed kernel: same rows, float64 masked reference of the pattern
                    chk = torch.randperm(n, generator=torch.Generator().manual_seed(args.seed + 1))[:128]
                    ref_rows = masked_rows_reference(q, k, v, pat, chk)
                    err_pattern = relative_error(out[:, :, chk.to(device)], ref_rows)
                    g = pat.block_graph()
                    nb = g.shape[-1]
                    work_dense = nb * (nb + 1) / 2 if causal else nb * nb
                    row = dict(base, predictor=name, density=pat.density(),
                               work_vs_dense=float(g.sum()) / (g.shape[0] * g.shape[1] * work_dense),
                               recall_mass=rec["mass"], recall_mass_min_head=rec["mass_min_head"],
                               recall_top64=rec["topk"], rel_error=relative_error(out, o_dense),
                               err_vs_masked_ref=err_pattern,
                               predict_mask_ms=t_pred, flex_ms=t_attn, total_ms=t_total,
                               speedup_total=t_dense / t_total, speedup_attn=t_dense / t_attn,
                               kernel_options=kopts, first_call_s=first_call_s,
                               compiled_predictor=bool(getattr(pred, "compile", False)),
                               speedup_vs_cudnn=t_cudnn / t_total)
                    rows.append(row)
                    print(f"N={n:6d} {case:11s} c={int(causal)} {name:16s} dens={row['density']:.3f} "
                          f"work={row['work_vs_dense']:.3f} rec={rec['mass']:.3f}/{rec['mass_min_head']:.3f} "
                          f"top64={rec['topk']:.3f} err={row['rel_error']:.3g} pat_err={err_pattern:.2g} dense={t_dense:.2f} "
                          f"pred={t_pred:.2f} flex={t_attn:.2f} total={t_total:.2f} x{row['speedup_total']:.2f} first={first_call_s:.1f}s",
                          flush=True)
                except Exception as e:  # keep going: one failing config must not lose the run
                    msg = f"N={n} {case} causal={causal} {name}: {type(e).__name__}: {str(e)[:300]}"
                    skipped.append(msg)
                    print("FAIL", msg, flush=True)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            save()
            q = k = v = o_dense = None  # free this size before the next one
        except Exception as e:
            msg = f"N={n} {case} causal={causal}: {type(e).__name__}: {str(e)[:300]}"
            skipped.append(msg)
            print("FAIL", msg, flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    save()
    # final table
    print("\n| N | case | causal | predictor | density | recall(mass) | min-head | top64 | rel err | dense ms | "
          "pred+mask ms | flex ms | total ms | speed-up | cuDNN ms | vs cuDNN |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in sorted(rows, key=lambda r: (r["case"], r["causal"], r["N"])):
        print(f"| {r['N']} | {r['case']} | {int(r['causal'])} | {r['predictor']} | {r['density']:.3f} | "
              f"{r['recall_mass']:.3f} | {r['recall_mass_min_head']:.3f} | {r['recall_top64']:.3f} | "
              f"{r['rel_error']:.3g} | {r['dense_ms']:.2f} | {r['predict_mask_ms']:.2f} | {r['flex_ms']:.2f} | "
              f"{r['total_ms']:.2f} | {r['speedup_total']:.2f}x | {r['dense_cudnn_ms']:.2f} | {r['speedup_vs_cudnn']:.2f}x |")
    if skipped:
        print("skipped/failed:", *skipped, sep="\n  ")
    print(f"wall {time.time() - t_start:.0f}s; wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
