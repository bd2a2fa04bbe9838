"""FlexAttention kernel efficiency on causal block-sparse patterns vs SDPA (cuDNN and FlashAttention).

For head dims 64 and 128, causal, bf16: patterns = the diagonal tile (partial, causal mask_mod) + a random
subset of the strictly-lower tiles (full: no mask_mod), at causal-tile densities 5-100%. Each pattern runs
through FlexAttention with several ``kernel_options`` (BLOCK_M/BLOCK_N/num_warps/num_stages, plus the
``ROWS_GUARANTEED_SAFE``/``PRESCALE_QK`` flags that a kept diagonal makes valid). Reported per setting:
flex time, cuDNN and FLASH SDPA causal time (same run), ideal speed-up 1/density over cuDNN and the
efficiency = achieved speed-up / ideal = t_cudnn * density / t_flex. Density counts causal tiles (the work
cuDNN causal does is nb(nb+1)/2 tiles). Timing: CUDA events, median of ``--reps`` after warm-up.

``--quick``: tiny CPU smoke test (no kernel: only the pattern/mask construction and table).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Any, Callable

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

from attnlab.blocksparse.blockmask import BlockPattern, block_graph_to_kv  # noqa: E402
from attnlab.timing import time_ms  # noqa: E402

#: kernel_options candidates (name -> options); None = FlexAttention's own default choice
KERNEL_OPTIONS: dict[str, dict[str, Any] | None] = {
    "default": None,
    "safe": {"ROWS_GUARANTEED_SAFE": True},
    "m128n64w8s3": {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3, "ROWS_GUARANTEED_SAFE": True},
    "m128n128w8s2": {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 2, "ROWS_GUARANTEED_SAFE": True},
    "m128n64w4s3": {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3, "ROWS_GUARANTEED_SAFE": True},
    "m64n64w4s3": {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3, "ROWS_GUARANTEED_SAFE": True},
    "m128n128w8s3": {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 3, "ROWS_GUARANTEED_SAFE": True},
    "m128n64w8s3pre": {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3, "ROWS_GUARANTEED_SAFE": True,
                       "PRESCALE_QK": True},
    "m128n64w8s3tma": {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3, "ROWS_GUARANTEED_SAFE": True,
                       "USE_TMA": True},
}


def time_fn(fn: Callable[[], Any], device: torch.device, reps: int, warmup: int) -> tuple[float, float]:
    """(median, IQR/2) milliseconds of ``fn`` after ``warmup`` calls (CUDA events on GPU)."""
    times = time_ms(fn, device, reps, warmup)
    q = statistics.quantiles(times, n=4) if len(times) >= 4 else [min(times), 0, max(times)]
    return statistics.median(times), (q[2] - q[0]) / 2


def random_causal_pattern(H: int, nb: int, density: float, block_size: int, seed: int,
                          device: torch.device) -> BlockPattern:
    """Diagonal + random strictly-lower tiles so that kept / causal tiles ~= density (per head)."""
    g = torch.Generator().manual_seed(seed)
    n_causal = nb * (nb + 1) // 2
    extra = max(0.0, density * n_causal - nb) / max(1, n_causal - nb)
    graph = torch.rand(1, H, nb, nb, generator=g) < extra
    graph = (graph & torch.ones(nb, nb, dtype=torch.bool).tril(-1)) | torch.eye(nb, dtype=torch.bool)
    return BlockPattern(block_graph_to_kv(graph.to(device), True), block_size, True)


def causal_density(pat: BlockPattern) -> float:
    """Kept tiles / causal tiles nb(nb+1)/2."""
    g = pat.block_graph()
    nb = g.shape[-1]
    return float(g.sum()) / (g.shape[0] * g.shape[1] * nb * (nb + 1) / 2)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ns", default="16384,32768")
    ap.add_argument("--dims", default="64:8,128:16", help="head_dim:heads pairs")
    ap.add_argument("--densities", default="0.05,0.1,0.2,0.35,0.5,1.0")
    ap.add_argument("--options", default=",".join(KERNEL_OPTIONS))
    ap.add_argument("--block", type=int, default=128)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--time-limit", type=float, default=240.0)
    ap.add_argument("--out", default="results/block_kernels.json")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    t0 = time.time()
    cuda = torch.cuda.is_available() and not args.quick
    device = torch.device("cuda" if cuda else "cpu")
    ns = [512] if args.quick else [int(x) for x in args.ns.split(",")]
    dims = [(32, 2)] if args.quick else [tuple(int(v) for v in d.split(":")) for d in args.dims.split(",")]
    bs = 64 if args.quick else args.block
    dens = [float(x) for x in args.densities.split(",")]
    opts = [o for o in args.options.split(",") if o in KERNEL_OPTIONS]
    meta = {"torch": torch.__version__, "device": torch.cuda.get_device_name() if cuda else "cpu",
            "block_size": bs, "dtype": "bfloat16" if cuda else "float32", "reps": args.reps}
    print(json.dumps(meta), flush=True)
    rows: list[dict[str, Any]] = []
    if cuda:
        from torch.nn.attention import SDPBackend, sdpa_kernel
        from torch.nn.functional import scaled_dot_product_attention as sdpa

        from attnlab.blocksparse.flex import compiled_flex_attention

        flex = compiled_flex_attention()
    for n in ns:
        for D, H in dims:
            if time.time() - t0 > args.time_limit:
                print(f"SKIP N={n} D={D}: time limit", flush=True)
                continue
            g = torch.Generator(device=device).manual_seed(0)
            dt = torch.bfloat16 if cuda else torch.float32
            q, k, v = (torch.randn(1, H, n, D, generator=g, device=device).to(dt) for _ in range(3))
            base: dict[str, Any] = {"N": n, "D": D, "H": H}
            if cuda:
                def cudnn() -> torch.Tensor:
                    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                        return sdpa(q, k, v, is_causal=True)

                def fa() -> torch.Tensor:
                    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                        return sdpa(q, k, v, is_causal=True)

                base["cudnn_ms"], base["cudnn_spread"] = time_fn(cudnn, device, args.reps, args.warmup)
                base["flash_ms"], base["flash_spread"] = time_fn(fa, device, args.reps, args.warmup)
                ref = fa().float()
                print(f"N={n} D={D} H={H}: cuDNN {base['cudnn_ms']:.3f} ms, FLASH {base['flash_ms']:.3f} ms",
                      flush=True)
            for d in dens:
                pat = random_causal_pattern(H, n // bs, d, bs, 1, device)
                cd = causal_density(pat)
                t_m = time.perf_counter()
                bm = pat.block_mask()
                mask_ms = (time.perf_counter() - t_m) * 1e3
                part = int(pat.kv.kv_num_blocks.sum())
                full = int(pat.kv.full_kv_num_blocks.sum())
                for oname in opts:
                    if time.time() - t0 > args.time_limit:
                        break
                    row = dict(base, density=cd, options=oname, partial_tiles=part, full_tiles=full,
                               mask_build_ms=mask_ms)
                    if cuda:
                        ko = KERNEL_OPTIONS[oname]
                        try:
                            out = flex(q, k, v, block_mask=bm, kernel_options=ko)
                            if d >= 1.0:
                                row["err_vs_flash"] = float((out.float() - ref).norm() / ref.norm())
                            row["flex_ms"], row["flex_spread"] = time_fn(
                                lambda: flex(q, k, v, block_mask=bm, kernel_options=ko), device, args.reps, args.warmup)
                            row["speedup_vs_cudnn"] = base["cudnn_ms"] / row["flex_ms"]
                            row["ideal"] = 1.0 / cd
                            row["efficiency"] = row["speedup_vs_cudnn"] * cd
                            print(f"  dens={cd:.3f} {oname:16s} flex {row['flex_ms']:.3f} ms  "
                                  f"x{row['speedup_vs_cudnn']:.2f} "
                                  f"vs cuDNN (ideal {row['ideal']:.1f}) eff {row['efficiency']:.2f}", flush=True)
                        except Exception as e:
                            row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
                            print(f"  dens={cd:.3f} {oname}: FAIL {row['error']}", flush=True)
                    rows.append(row)
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out + ".tmp", "w") as f:
                json.dump({"meta": meta, "rows": rows}, f, indent=1)
            os.replace(args.out + ".tmp", args.out)
    # best options per (N, D) at each density
    print("\n| N | D | density | best options | flex ms | cuDNN ms | FLASH ms | speed-up vs cuDNN | efficiency |")
    print("|---|---|---|---|---|---|---|---|---|")
    keys = sorted({(r["N"], r["D"], round(r["density"], 3)) for r in rows})
    for key in keys:
        cand = [r for r in rows if (r["N"], r["D"], round(r["density"], 3)) == key and "flex_ms" in r]
        if not cand:
            print(f"| {key[0]} | {key[1]} | {key[2]:.3f} | (no kernel on this device) | | | | | |")
            continue
        b = min(cand, key=lambda r: r["flex_ms"])
        print(f"| {key[0]} | {key[1]} | {key[2]:.3f} | {b['options']} | {b['flex_ms']:.3f} | {b['cudnn_ms']:.3f} | "
              f"{b['flash_ms']:.3f} | {b['speedup_vs_cudnn']:.2f}x | {b['efficiency']:.2f} |")
    print(f"wall {time.time() - t0:.0f}s; wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
