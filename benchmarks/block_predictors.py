"""Block predictors on a trained model's real attention: recall, density vs the oracle, prediction and kernel
time against cuDNN and FlashAttention SDPA.

Input: q, k, v of every layer of a causal HF model (``--model PATH``; by default the trained byte-level Llama
of ``attnlab lm train``), captured through transformers' ``AttentionInterface`` on one held-out window of
``N`` tokens of the Python standard-library source (documents held out by the same path-hash rule as
``attnlab.lm.data``). When the model folder does not exist (or with ``--quick``) a randomly initialised Llama
of the reference shape (tiny with ``--quick``) stands in: its rows are labelled ``untrained``.

Per length N, layer, target p and predictor (``attnlab.blocksparse.predictors.BLOCK_PREDICTORS``; calibrated per
head unless the name ends in ``@published``, which uses the paper's own knob): measured recall on 512
held-out rows (odd positions; calibration uses even ones) per head -- min and mean -- and density (kept /
causal tiles); exact recall over ALL rows (from the exact tile mass; not for permuted patterns); the
oracle's density at the predictor's recall per head (exact all-row recall where available, else the measured
one; ``oracle`` = top-p per query block, ``oracle-global`` = the minimum over all block patterns);
prediction time (calibration and mask building included, CUDA-synchronised wall time, median of
``--pred-reps``; per-phase times in ``predict_phase_ms``); FlexAttention time with the
prebuilt mask (CUDA events, median of ``--reps``); cuDNN and FLASH SDPA causal time on the same q, k, v;
total = prediction + kernel; kernel efficiency = (t_cuDNN / t_flex) * density (1 = the ideal 1/density
speed-up); ``loses`` flags settings where total > cuDNN (the prefill must then run dense).

``--quick``: CPU, tiny untrained model, exact masked path (no timings that mean anything).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import sysconfig
import time
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

from attnlab.blocksparse.blockmask import BlockPattern  # noqa: E402
from attnlab.blocksparse.predictors import BLOCK_PREDICTORS, head_recall, make_block_predictor, tile_density  # noqa: E402
from attnlab.blocksparse.predictors.core import (  # noqa: E402
    calibrate_knob, exact_block_mass, graph_pattern, keep_graph, mass_thresholds)
from attnlab.timing import time_ms as time_each  # noqa: E402
from attnlab.blocksparse.flex import masked_rows_reference, relative_error, run_pattern, tuned_kernel_options  # noqa: E402

DEFAULT_MODEL = ".carry/lm"
PREDICTORS = ["oracle", "oracle-global", "minference", "xattention", "flexprefill", "pooled", "cluster",
              "minference@published", "xattention@published", "flexprefill@published"]


# --------------------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------------------


def heldout_stream(min_tokens: int, frac: float = 0.05) -> torch.Tensor:
    """Byte ids (+3, ByT5 convention) of held-out stdlib documents joined by EOS (1), at least ``min_tokens``:
    documents whose path hash falls under ``frac`` first, then further documents in path order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts)

    def held(p: Path) -> bool:
        h = int.from_bytes(hashlib.sha1(str(p.relative_to(root)).encode()).digest()[:8], "little")
        return (h % 10_000) < frac * 10_000

    order = [p for p in files if held(p)] + [p for p in files if not held(p)][::-1]
    out, n = [], 0
    for p in order:
        data = p.read_bytes()
        if not data:
            continue
        out.append(torch.tensor(list(data), dtype=torch.int64) + 3)
        out.append(torch.tensor([1]))
        n += len(data) + 1
        if n >= min_tokens:
            break
    return torch.cat(out)[:min_tokens]


def load_model(path: str | None, device: torch.device, quick: bool) -> tuple[Any, str]:
    """(LlamaModel backbone, label): the trained folder, or a tiny untrained Llama."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    if path and Path(path).exists() and not quick:
        m = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.bfloat16)
        label = f"trained:{path}"
    else:
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=259, hidden_size=64 if quick else 512, intermediate_size=128 if quick else 1536,
                          num_hidden_layers=2 if quick else 6, num_attention_heads=4 if quick else 8,
                          num_key_value_heads=2, max_position_embeddings=131072)
        m = LlamaForCausalLM(cfg)
        label = "untrained"
    dt = torch.bfloat16 if device.type == "cuda" else torch.float32
    return m.model.to(device=device, dtype=dt).eval(), label


def capture_qkv(backbone: Any, ids: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]]:
    """(q, k, v, scaling) of every attention layer (after RoPE; k, v with the model's kv heads)."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    store: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]] = []

    def capture(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kw):
        store.append((query.detach().clone(), key.detach().clone(), value.detach().clone(),
                      float(scaling if scaling is not None else query.shape[-1] ** -0.5)))
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kw)

    AttentionInterface.register("attnlab_bench_capture", capture)
    old = backbone.config._attn_implementation
    try:
        if hasattr(backbone, "set_attn_implementation"):
            backbone.set_attn_implementation("attnlab_bench_capture")
        else:  # pragma: no cover
            backbone.config._attn_implementation = "attnlab_bench_capture"
        with torch.no_grad():
            backbone(input_ids=ids.to(next(backbone.parameters()).device))
    finally:
        if hasattr(backbone, "set_attn_implementation"):
            backbone.set_attn_implementation(old)
        else:  # pragma: no cover
            backbone.config._attn_implementation = old
    return store


# --------------------------------------------------------------------------------------------------
# timing
# --------------------------------------------------------------------------------------------------


def time_ms(fn: Callable[[], Any], device: torch.device, reps: int, warmup: int = 2) -> tuple[float, float]:
    """(median, half inter-quartile range) ms; CUDA events on GPU."""
    ts = time_each(fn, device, reps, warmup)
    qs = statistics.quantiles(ts, n=4) if len(ts) >= 4 else [min(ts), 0, max(ts)]
    return statistics.median(ts), (qs[2] - qs[0]) / 2


def wall_ms(fn: Callable[[], Any], device: torch.device, reps: int) -> tuple[float, Any]:
    """Median synchronised wall time (ms) of ``fn`` (host work included: prediction syncs) and its last result."""
    ts, out = [], None
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        ts.append((time.perf_counter() - t) * 1e3)
    return statistics.median(ts), out


def oracle_density_at(mass: torch.Tensor, recall: torch.Tensor, block_size: int, scope: str) -> float:
    """Density of the exact oracle (top-p per query block, or per head) whose exact mean recall over all rows
    equals the measured per-head ``recall`` (H,): the per-head threshold is found exactly (calibrate_knob
    with the query blocks as rows)."""
    B, H, nq, nk = mass.shape
    th = mass_thresholds(mass, True, 0, scope)
    q_tile = torch.arange(nq, device=mass.device).view(1, 1, nq).expand(B, H, nq)
    knob, _ = calibrate_knob(th, mass, q_tile, recall.to(mass.device).clamp(max=1.0))
    return tile_density(graph_pattern(keep_graph(th, knob), block_size, True))


def exact_recall(pattern: BlockPattern, mass: torch.Tensor) -> torch.Tensor | None:
    """Exact recall per head over ALL rows (mean over query blocks of kept exact tile mass); None if permuted."""
    if pattern.permuted:
        return None
    return (pattern.block_graph().to(mass.dtype) * mass).sum(-1).mean(dim=(0, 2))


# --------------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=DEFAULT_MODEL, help="HF folder of a causal LM (default: the trained LM)")
    ap.add_argument("--ns", default="16384,32768")
    ap.add_argument("--ps", default="0.9,0.95,0.98")
    ap.add_argument("--predictors", default=",".join(PREDICTORS))
    ap.add_argument("--published-ps", default="0.95",
                    help="p values at which the @published variants and the (permuted, slower) cluster run")
    ap.add_argument("--layers", default="", help="comma list (default: all)")
    ap.add_argument("--block", type=int, default=128)
    ap.add_argument("--rows", type=int, default=512, help="held-out rows for measured recall")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--pred-reps", type=int, default=3)
    ap.add_argument("--time-limit", type=float, default=500.0)
    ap.add_argument("--out", default="results/block_predictors.json")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    t0 = time.time()
    cuda = torch.cuda.is_available() and not args.quick
    device = torch.device("cuda" if cuda else "cpu")
    ns = [256] if args.quick else [int(x) for x in args.ns.split(",")]
    bs = 32 if args.quick else args.block
    ps = [0.95] if args.quick else [float(x) for x in args.ps.split(",")]
    pub_ps = {0.95} if args.quick else {float(x) for x in args.published_ps.split(",") if x}
    if args.quick:
        args.layers, args.rows = args.layers or "0", 128
    names = [n for n in args.predictors.split(",") if n]
    for n in names:
        BLOCK_PREDICTORS.get(n.split("@")[0])  # unknown names fail before any work
    backbone, label = load_model(args.model, device, args.quick)
    meta = {"torch": torch.__version__, "device": torch.cuda.get_device_name() if cuda else "cpu", "model": label,
            "block_size": bs, "dtype": str(next(backbone.parameters()).dtype), "reps": args.reps,
            "recall_rows": args.rows, "note": "ms; density = kept/causal tiles; efficiency = cuDNN/flex*density"}
    print(json.dumps(meta), flush=True)
    rows: list[dict[str, Any]] = []
    skipped: list[str] = []

    def save() -> None:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out + ".tmp", "w") as f:
            json.dump({"meta": meta, "rows": rows, "skipped": skipped}, f, indent=1)
        os.replace(args.out + ".tmp", args.out)

    for n in ns:
        ids = heldout_stream(n).view(1, n)
        layers = capture_qkv(backbone, ids)
        chosen = [int(x) for x in args.layers.split(",")] if args.layers else list(range(len(layers)))
        for li in chosen:
            q, k, v, scale = layers[li]
            H, D = q.shape[1], q.shape[-1]
            k = k.repeat_interleave(H // k.shape[1], 1)
            v = v.repeat_interleave(H // v.shape[1], 1)
            kopts = tuned_kernel_options(D) if cuda else None
            base: dict[str, Any] = {"N": n, "layer": li, "H": H, "D": D}
            if cuda:
                from torch.nn.attention import SDPBackend, sdpa_kernel
                from torch.nn.functional import scaled_dot_product_attention as sdpa

                def dense(backend: Any) -> Callable[[], torch.Tensor]:
                    def f() -> torch.Tensor:
                        with sdpa_kernel(backend):
                            return sdpa(q, k, v, is_causal=True, scale=scale)
                    return f

                base["cudnn_ms"], base["cudnn_spread"] = time_ms(dense(SDPBackend.CUDNN_ATTENTION), device, args.reps)
                base["flash_ms"], base["flash_spread"] = time_ms(dense(SDPBackend.FLASH_ATTENTION), device, args.reps)
            mass = exact_block_mass(q, k, bs, True, scale)
            for p in ps:
                for name in names:
                    published = name.endswith("@published")
                    if (published or name == "cluster") and p not in pub_ps:
                        continue
                    if time.time() - t0 > args.time_limit:
                        skipped.append(f"N={n} L{li} p={p} {name}: time limit")
                        continue
                    try:
                        pred = make_block_predictor(name.split("@")[0], **({"calibrate": False} if published else {}))

                        def predict() -> tuple[Any, Any]:
                            r = pred.predict(q, k, causal=True, block_size=bs, p=p, scale=scale)
                            return r, (r.pattern.block_mask() if cuda else None)

                        t_pred, (res, bm) = wall_ms(predict, device, 1 if not cuda or name.startswith("oracle")
                                                    else args.pred_reps)
                        pat: BlockPattern = res.pattern
                        if cuda:  # one more call with per-phase CUDA-synchronised timings
                            pred.profile = True
                            phase_ms = pred.predict(q, k, causal=True, block_size=bs, p=p, scale=scale).info.get("ms")
                            pred.profile = False
                        else:
                            phase_ms = None
                        hr = head_recall(q, k, pat, rows=args.rows, scale=scale)
                        dens = tile_density(pat)
                        ex = exact_recall(pat, mass)
                        cmp = hr["per_head"] if ex is None else ex  # exact all-row recall where computable
                        o_row = oracle_density_at(mass, cmp, bs, "row")
                        o_glob = oracle_density_at(mass, cmp, bs, "head")
                        row = dict(base, p=p, predictor=name, density=dens, recall_min=hr["min"],
                                   recall_mean=hr["mean"], recall_per_head=hr["per_head"].tolist(),
                                   met=hr["min"] >= p, over=hr["mean"] - p,
                                   recall_all_min=None if ex is None else float(ex.min()),
                                   recall_all_mean=None if ex is None else float(ex.mean()),
                                   oracle_density_at_recall=o_row, oracle_global_density_at_recall=o_glob,
                                   vs_oracle=dens / max(o_row, 1e-9), vs_oracle_global=dens / max(o_glob, 1e-9),
                                   predict_ms=t_pred, predict_phase_ms=phase_ms, predict_macs=res.cost, label=label,
                                   knob=None if res.knob is None else res.knob.tolist())
                        if cuda:
                            out = run_pattern(q, k, v, pat, backend="flex", scale=scale, block_mask=bm,
                                              kernel_options=kopts)
                            chk = torch.randperm(n, generator=torch.Generator().manual_seed(1))[:64].sort().values
                            row["err_vs_pattern_ref"] = relative_error(
                                out[:, :, chk.to(device)], masked_rows_reference(q, k, v, pat, chk, scale))
                            row["flex_ms"], row["flex_spread"] = time_ms(
                                lambda: run_pattern(q, k, v, pat, backend="flex", scale=scale, block_mask=bm,
                                                    kernel_options=kopts), device, args.reps)
                            row["total_ms"] = t_pred + row["flex_ms"]
                            row["speedup_total_vs_cudnn"] = base["cudnn_ms"] / row["total_ms"]
                            row["speedup_total_vs_flash"] = base["flash_ms"] / row["total_ms"]
                            row["speedup_kernel_vs_cudnn"] = base["cudnn_ms"] / row["flex_ms"]
                            row["efficiency"] = row["speedup_kernel_vs_cudnn"] * dens
                            row["loses"] = row["total_ms"] > base["cudnn_ms"]
                        rows.append(row)
                        print(f"N={n} L{li} p={p} {name:22s} dens={dens:.3f} rec min/mean {hr['min']:.3f}/"
                              f"{hr['mean']:.3f} (all rows {row['recall_all_min'] or float('nan'):.3f}) "
                              f"vs oracle {row['vs_oracle']:.2f} (glob {row['vs_oracle_global']:.2f}) "
                              f"pred {t_pred:.1f} ms"
                              + (f" flex {row['flex_ms']:.2f} cuDNN {base['cudnn_ms']:.2f} total x"
                                 f"{row['speedup_total_vs_cudnn']:.2f} eff {row['efficiency']:.2f}" if cuda else ""),
                              flush=True)
                    except Exception as e:  # one failing setting must not lose the run
                        msg = f"N={n} L{li} p={p} {name}: {type(e).__name__}: {str(e)[:300]}"
                        skipped.append(msg)
                        print("FAIL", msg, flush=True)
            save()
            mass = None
        layers = None
        if cuda:
            torch.cuda.empty_cache()
    save()
    summary(rows, ps, ns, cuda)
    if skipped:
        print("skipped/failed:", *skipped[:20], sep="\n  ")
    print(f"wall {time.time() - t0:.0f}s; wrote {args.out}")
    return 0


def summary(rows: list[dict[str, Any]], ps: list[float], ns: list[int], cuda: bool) -> None:
    """Per (N, p, predictor), over layers: recall (min over heads and layers, mean), density (mean [range]),
    density vs oracle (mean), prediction ms per layer (mean), flex/cuDNN/FLASH ms summed over layers, total
    (prediction + flex) vs cuDNN summed over layers, mean efficiency over layers with density 5-50%."""
    print("\n| N | p | predictor | min recall | mean recall | met | all-rows min | density | vs oracle | "
          "vs oracle-global | "
          "pred ms/layer | flex ms (all layers) | cuDNN ms (all) | FLASH ms (all) | total vs cuDNN | eff (5-50%) | "
          "loses (layers) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for n in ns:
        for p in ps:
            names = list(dict.fromkeys(r["predictor"] for r in rows if r["N"] == n and r["p"] == p))
            for name in names:
                rs = [r for r in rows if r["N"] == n and r["p"] == p and r["predictor"] == name]
                mean = lambda key: sum(r[key] for r in rs) / len(rs)  # noqa: E731
                line = (f"| {n} | {p} | {name} | {min(r['recall_min'] for r in rs):.3f} | {mean('recall_mean'):.3f} | "
                        f"{'yes' if all(r['met'] for r in rs) else 'NO'} | "
                        + (f"{min(r['recall_all_min'] for r in rs):.3f}" if all(r['recall_all_min'] is not None
                                                                               for r in rs) else "-")
                        + f" | {mean('density'):.3f} "
                        f"[{min(r['density'] for r in rs):.2f}-{max(r['density'] for r in rs):.2f}] | "
                        f"{mean('vs_oracle'):.2f} | {mean('vs_oracle_global'):.2f} | {mean('predict_ms'):.1f} |")
                if cuda and all("flex_ms" in r for r in rs):
                    eff = [r["efficiency"] for r in rs if 0.05 <= r["density"] <= 0.5]
                    tot = sum(r["total_ms"] for r in rs)
                    line += (f" {sum(r['flex_ms'] for r in rs):.2f} | {sum(r['cudnn_ms'] for r in rs):.2f} | "
                             f"{sum(r['flash_ms'] for r in rs):.2f} | {sum(r['cudnn_ms'] for r in rs) / tot:.2f}x | "
                             + (f"{sum(eff) / len(eff):.2f} ({len(eff)})" if eff else "-")
                             + f" | {sum(r['loses'] for r in rs)}/{len(rs)} |")
                else:
                    line += " - | - | - | - | - | - |"
                print(line)


if __name__ == "__main__":
    raise SystemExit(main())
