"""Predicted alpha-entmax attention executed block-sparsely (fused Triton kernel on CUDA, ``--backend flex`` for the
FlexAttention passes; safeguarded Newton on tau), causal
and non-causal, against AdaSplash (AdaSplash-2 causal, v1 non-causal), softmax SDPA and dense ``entmax_bisect``
(where it fits), all in the same run, from 4k to 64k tokens.

Inputs are SYNTHETIC (labelled): queries and keys share sinusoidal position features (attention decays with
distance, so entmax is local) plus content noise and a few "sink" keys every query likes -- the shape of real
long-context entmax heads. The predicted graph is a block graph from a cheap block predictor (mean-pooled q and
k per 128-token block, top-m key blocks per query block, plus the diagonal band and the first block); its
cost (pooling, block scores, top-m, BlockMask build) is counted in the sparse time. Recall of the gold entmax
support and output error are measured on a sample of rows against dense float32 entmax.

    python benchmarks/sparse_entmax.py --quick      # CPU smoke run (eager flex, tiny sizes)
    python benchmarks/sparse_entmax.py              # CUDA: 4k ... 64k, causal and non-causal

AdaSplash (``pip install 'attnlab[gpu]'``) is timed in the same run on the same inputs; its error is measured
like ours, against float64 dense entmax on sampled rows. The threshold solver's pass count (passes over the kept
tiles, prediction excluded) is printed per case, with the model FLOP rate of the attention part.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402
from attnlab.timing import time_ms  # noqa: E402



def synthetic_qkv(B: int, H: int, N: int, d: int, device, dtype, seed: int = 0, strength: float = 2.2,
                  n_sinks: int = 4):
    """Structured q, k, v: shared position features (local attention), content noise, a few sink keys."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    half = d // 4
    freqs = 2 * math.pi / torch.logspace(math.log10(16), math.log10(max(N, 32)), half)
    pos = torch.arange(N, dtype=torch.float32)[:, None] * freqs[None]
    feat = torch.cat([pos.cos(), pos.sin()], dim=-1) / math.sqrt(half)  # (N, d/2), unit norm
    def side():
        c = torch.randn(B, H, N, d - 2 * half - 1, generator=g) * 0.6
        return torch.cat([strength * math.sqrt(d) ** 0.5 * feat.expand(B, H, N, -1), c, torch.zeros(B, H, N, 1)], -1)
    q, k = side(), side()
    q[..., -1] = 1.0
    sinks = torch.randint(N, (n_sinks,), generator=g)
    sinks[0] = 0
    k[:, :, sinks, -1] = 3.0 * math.sqrt(d) ** 0.5
    v = torch.randn(B, H, N, d, generator=g)
    return q.to(device, dtype), k.to(device, dtype), v.to(device, dtype)


def predict_blocks(q, k, block: int, keep: int, band: int = 1):
    """Block graph (B, H, nb, nb): top-``keep`` key blocks by pooled score per query block + band + first block."""
    B, H, N, d = q.shape
    nb = N // block
    qb = q.view(B, H, nb, block, d).float().mean(3)
    kb = k.view(B, k.shape[1], nb, block, d).float()
    G = H // k.shape[1]  # grouped-query attention: pooled keys shared by the query group
    kmax, kmean = kb.amax(3).repeat_interleave(G, 1), kb.mean(3).repeat_interleave(G, 1)  # max catches sinks
    s = torch.maximum(qb @ kmean.transpose(-1, -2), qb @ kmax.transpose(-1, -2))
    g = torch.zeros(B, H, nb, nb, dtype=torch.bool, device=q.device)
    g.scatter_(-1, s.topk(min(keep, nb), dim=-1).indices, True)
    i = torch.arange(nb, device=q.device)
    g |= (i[:, None] - i[None, :]).abs() <= band
    g[..., 0] = True
    return g


def timed(fn, reps: int, cuda: bool) -> float:
    """Median milliseconds of ``reps`` calls (CUDA events on GPU); the upper median for even ``reps``."""
    out = sorted(time_ms(fn, "cuda" if cuda else "cpu", reps, warmup=1))
    return out[len(out) // 2]


def sampled_reference(q, k, v, idx, alpha, causal):
    """float64 dense entmax (``entmax_bisect``, 80 steps) on query rows ``idx`` of the (bf16) inputs upcast:
    (output, probabilities)."""
    from entmax import entmax_bisect

    G = q.shape[1] // k.shape[1]
    kk, vv = k.repeat_interleave(G, 1).double(), v.repeat_interleave(G, 1).double()
    sc = (q[:, :, idx].double() @ kk.transpose(-1, -2)) * q.shape[-1] ** -0.5
    if causal:
        sc = sc.masked_fill(torch.arange(k.shape[2], device=q.device)[None, :] > idx[:, None], float("-inf"))
    p = entmax_bisect(sc, alpha=alpha, dim=-1, n_iter=80)
    return p @ vv, p


def rel_err(out, idx, ref) -> float:
    return float((out[:, :, idx].double() - ref).norm() / ref.norm())


def kept_pairs(bg, block: int, causal: bool) -> float:
    """Pairs the sparse kernel scores (all heads): kept tiles x block^2, the causal diagonal tiles counted whole
    (the kernel computes them whole and masks)."""
    return float(bg.sum()) * block * block


def one_case(N, causal, args, dev, dtype, cuda, block, H, reps):
    """All contenders at one length and masking; returns the result row."""
    from attnlab.blocksparse.entmax_dense import adasplash_available, dense_entmax_attention
    from attnlab.blocksparse.sparse_entmax import block_mask_from_graph, sparse_entmax_attention

    q, k, v = synthetic_qkv(1, H, N, args.dim, dev, dtype)
    if args.kv_heads < H:
        k, v = k[:, :args.kv_heads].contiguous(), v[:, :args.kv_heads].contiguous()
    nb = N // block
    keep = max(1, round(args.keep * nb))

    from attnlab.blocksparse.sparse_entmax import block_csr_from_graph, resolve_sparse_backend

    use_csr = args.mask == "csr" and resolve_sparse_backend(q, block_csr_from_graph(
        torch.ones(1, 1, 1, 1, dtype=torch.bool, device=dev), block), args.backend) == "triton"
    build = block_csr_from_graph if use_csr else block_mask_from_graph

    def predict_and_mask():
        return build(predict_blocks(q, k, block, keep), block, causal=causal)

    def sparse():
        return sparse_entmax_attention(q, k, v, predict_and_mask(), args.alpha, n_iter=args.n_iter, tol=args.tol,
                                       return_info=True, backend=args.backend)

    t0 = time.time()
    info = sparse()  # compile + warm-up
    compile_s = time.time() - t0
    row = {"n": N, "causal": causal, "heads": H, "kv_heads": k.shape[1], "d": args.dim, "block": block,
           "backend": resolve_sparse_backend(q, predict_and_mask(), args.backend), "mask": "csr" if use_csr else
           "blockmask", "passes": info.passes, "newton_steps": info.steps, "residual": info.residual, "compile_s": compile_s}
    row["sparse_ms"] = timed(sparse, reps, cuda)
    row["mask_ms"] = timed(predict_and_mask, reps, cuda)
    bg = predict_blocks(q, k, block, keep)
    if causal:
        bg = (bg | torch.eye(nb, dtype=torch.bool, device=dev)).tril()
    row["block_density"] = float(bg.float().mean())
    # work model of the fused kernel: QK^T on the kept tiles in every pass (2 d flops a pair), p @ V once
    pairs = kept_pairs(bg, block, causal)
    row["kept_pairs"] = pairs
    row["model_gflop"] = pairs * (2 * args.dim * info.passes + 2 * args.dim) / 1e9
    row["attn_ms"] = row["sparse_ms"] - row["mask_ms"]
    row["attn_tflops"] = row["model_gflop"] / max(row["attn_ms"], 1e-9)  # GFLOP / ms = TFLOP/s
    g = torch.Generator(device="cpu").manual_seed(1)
    idx = torch.randperm(N, generator=g)[: args.sample_rows].sort().values.to(dev)
    ref, p = sampled_reference(q, k, v, idx, args.alpha, causal)
    gold = p > 0
    kept = bg[:, :, (idx // block)][..., torch.arange(N, device=dev) // block]
    row.update(gold_density=float(gold.float().mean()), recall_gold_support=float((gold & kept).sum() / gold.sum()),
               rel_error_ours=rel_err(info.out, idx, ref))
    G = H // k.shape[1]
    kr, vr = (k, v) if G == 1 else (k.repeat_interleave(G, 1), v.repeat_interleave(G, 1))
    row["sdpa_softmax_ms"] = timed(lambda: torch.nn.functional.scaled_dot_product_attention(q, kr, vr, is_causal=causal),
                                   reps, cuda)
    if cuda and adasplash_available():
        ada = lambda: dense_entmax_attention(q, k, v, args.alpha, causal=causal, backend="adasplash")  # noqa: E731
        out_a = ada()
        row["adasplash"] = "v2" if causal and args.alpha == 1.5 else "v1"
        row["adasplash_ms"] = timed(ada, reps, cuda)
        row["rel_error_adasplash"] = rel_err(out_a, idx, ref)
        del out_a
    if N <= args.dense_max:
        chunk = max(1, min(N, (1 << 28) // (H * N)))
        row["dense_entmax_ms"] = timed(lambda: dense_entmax_attention(q, k, v, args.alpha, n_iter=args.dense_iter,
                                                                     chunk=chunk, causal=causal, backend="entmax"),
                                       1, cuda)
    return row


def sweep_configs(N, causal, args, dev, dtype, block, H, reps) -> list[dict]:
    """Tile configs of the fused kernel at one length (attention only, same mask): which tiling the default
    should be."""
    from attnlab.blocksparse.kernels.entmax_triton import entmax_block_sparse_fwd
    from attnlab.blocksparse.sparse_entmax import block_mask_from_graph

    q, k, v = synthetic_qkv(1, H, N, args.dim, dev, dtype)
    bm = block_mask_from_graph(predict_blocks(q, k, block, max(1, round(args.keep * (N // block)))), block,
                               causal=causal)
    full = bm.full_kv_num_blocks is not None
    out = []
    for bm_, bn, w, st in [(128, 64, 8, 2), (128, 64, 4, 3), (64, 64, 4, 2), (128, 128, 8, 2)]:
        cfg = {"BLOCK_M": bm_, "BLOCK_N": bn, "num_warps": w, "num_stages": st}
        fn = lambda: entmax_block_sparse_fwd(q, k, v, bm.kv_num_blocks, bm.kv_indices, block, args.alpha,  # noqa: E731
                                             causal=causal, n_iter=args.n_iter, tol=args.tol,
                                             full_num=bm.full_kv_num_blocks if full else None,
                                             full_idx=bm.full_kv_indices if full else None, config=cfg)
        try:
            ms = timed(fn, reps, True)
        except Exception as e:  # a config the compiler rejects (shared memory)
            out.append({**cfg, "error": repr(e)[:200]})
            continue
        out.append({**cfg, "n": N, "causal": causal, "ms": ms})
        print(f"sweep n={N} causal={causal} {cfg}: {ms:.3f} ms", flush=True)
    return out


def fmt(r) -> str:
    ada = f"{r['adasplash_ms']:8.2f} ms ({r['adasplash']}, err {r['rel_error_adasplash']:.1e})" if "adasplash_ms" in r else "   -"
    dense = f"{r['dense_entmax_ms']:8.1f}" if "dense_entmax_ms" in r else "   -"
    return (f"n={r['n']:6d} {'causal' if r['causal'] else 'full  '} ours[{r['backend']}] {r['sparse_ms']:7.2f} ms "
            f"(mask {r['mask_ms']:.2f}, {r['attn_tflops']:.0f} TFLOP/s model, {r['passes']} passes, err {r['rel_error_ours']:.1e}, recall {r['recall_gold_support']:.4f}, tiles "
            f"{r['block_density']:.3f}) | AdaSplash {ada} | SDPA {r['sdpa_softmax_ms']:.2f} ms | entmax_bisect {dense}")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="CPU smoke run (tiny sizes, eager flex)")
    ap.add_argument("--lengths", default="4096,8192,16384,32768,65536")
    ap.add_argument("--modes", default="causal,full", help="causal and/or full (non-causal)")
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=8, help="key/value heads (fewer: grouped-query attention)")
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--block", type=int, default=128)
    ap.add_argument("--keep", type=float, default=0.06, help="share of key blocks kept per query block (top-m)")
    ap.add_argument("--alpha", type=float, default=1.5)
    ap.add_argument("--n-iter", type=int, default=12, help="maximum Newton steps of the sparse threshold")
    ap.add_argument("--tol", type=float, default=1e-3, help="tolerance on |log sum_j p_j| per row")
    ap.add_argument("--dense-iter", type=int, default=50, help="entmax_bisect steps of the dense baseline (its default)")
    ap.add_argument("--dense-max", type=int, default=16384, help="longest N for dense entmax_bisect")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--backend", default="auto", help="sparse entmax backend: auto, triton or flex")
    ap.add_argument("--mask", default="csr", choices=("csr", "blockmask"),
                    help="triton backend: the graph as a BlockCSR (a few ops) or a FlexAttention BlockMask (~300)")
    ap.add_argument("--sweep-n", type=int, default=0, help="CUDA: first time tile configs of the fused kernel at N")
    ap.add_argument("--sample-rows", type=int, default=256)
    ap.add_argument("--out", default=str(ROOT / "results" / "sparse_entmax.json"))
    args = ap.parse_args(argv)

    cuda = torch.cuda.is_available() and not args.quick
    dev = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    lengths = [128] if args.quick else [int(x) for x in args.lengths.split(",")]
    H = 2 if args.quick else args.heads
    args.kv_heads = min(args.kv_heads, H) if not args.quick else 1
    block = 32 if args.quick else args.block
    if args.quick:  # eager flex on CPU is slow: a smoke run only
        args.sample_rows, args.keep = 32, 0.25
    reps = 1 if args.quick else args.reps
    rows = []
    print(f"device {torch.cuda.get_device_name() if cuda else 'cpu'}; B=1 H={H} kv heads {args.kv_heads} d={args.dim} "
          f"block={block} alpha={args.alpha} dtype={dtype} tol={args.tol}; SYNTHETIC structured inputs", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sweep = sweep_configs(args.sweep_n, True, args, dev, dtype, block, H, reps) if cuda and args.sweep_n else []
    for mode in args.modes.split(","):  # all lengths of one mode first (a time-out keeps whole modes)
        for N in lengths:
            row = one_case(N, mode == "causal", args, dev, dtype, cuda, block, H, reps)
            rows.append(row)
            print(fmt(row), flush=True)
            out.write_text(json.dumps({"rows": rows, "sweep": sweep, "partial": True}, indent=1))  # survives a time-out
            if cuda:
                torch.cuda.empty_cache()
    res = {"rows": rows, "sweep": sweep, "device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
           "host": platform.node(), "args": vars(args), "inputs": "synthetic structured"}
    out.write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
