"""Sparse prefill on the trained reference model: recall, density vs the oracle, speed vs cuDNN / FLASH, loss.

For every sequence length N, recall target p and block predictor (every name the block-predictor registry
offers, plus the oracle), ``attnlab.blocksparse.prefill.run_prefill`` runs the trained byte-level Llama's real
forward on held-out stdlib text with every attention layer replaced by predicted block-sparse FlexAttention
(dense cuDNN SDPA for heads above the kernel's measured break-even density) and reports:

* per-head minimum recall (exact softmax mass kept on sampled query rows, every layer and head);
* mean predicted density (of the causal tiles) and its ratio to the oracle's at the same N and p;
* attention speed-up vs SDPA cuDNN and FLASH (prediction and mask building included; the oracle's exact
  block mass is a bound, so its time counts the same way and is not a deployable speed);
* whole-forward speed-up vs the same forward with SDPA cuDNN / FLASH attention;
* held-out loss change (nats/byte) vs the dense forward.

The model comes from ``--model PATH`` or is trained / loaded from the ``--cache`` folder (``attnlab lm train``
settings: preset 'gpu', or 'tiny' with ``--quick``). ``--synthetic`` also runs the planted-structure synthetic
case of ``benchmarks/sparse_attention.py`` (labelled synthetic). ``--quick`` is a CPU smoke test (tiny model,
exact masked path: timings not meaningful).

GPU box: ``PYTHONPATH=src python3 benchmarks/prefill.py --model .carry/lm --out $OUT/prefill.json``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x]


def _floats(s: str) -> list[float]:
    return [float(x) for x in s.split(",") if x]


def _row(res: dict, oracle_density: float | None) -> dict[str, Any]:
    s = res["summary"]
    sp = s["speedup"]
    row = {
        "N": res["config"]["seq_len"], "p": res["config"]["recall"], "predictor": res["config"]["predictor"],
        "recall_min_head": s["recall_min_head"], "recall_mean": s["recall_mean"],
        "recall_met": s["recall_met_every_head"],
        "density": s["density_predicted_mean"], "density_executed": s["density_executed_mean"],
        "density_vs_oracle": None if not oracle_density else s["density_predicted_mean"] / oracle_density,
        "fallback_heads": f"{s['dense_fallback_heads']}/{s['heads_total']}",
        "loss_dense": s["loss_dense"], "loss_delta": s["loss_delta"],
        "loss_delta_executed": s["loss_delta_executed"], "dense_layers": len(s.get("dense_layers", [])),
        "loss_delta_range": [s["loss_delta_min"], s["loss_delta_max"]],
        "out_error_max": s["out_error_max"],
    }
    for base in ("cudnn", "flash", "auto"):
        if base in sp:
            row[f"attn_x_{base}"] = sp[base]["unguarded_attention"]
            row[f"kernel_x_{base}"] = sp[base]["kernel_only"]
            row[f"exec_attn_x_{base}"] = sp[base]["attention_ms"]
            row[f"exec_fwd_x_{base}"] = sp[base]["forward_ms"]
            row[f"fwd_x_{base}"] = sp[base]["unguarded_forward"]
    t = res["timings"]
    for mode in t:
        row[f"attn_ms_{mode}"] = t[mode].get("attention_ms", {}).get("median")
        row[f"attn_ms_{mode}_range"] = [t[mode].get("attention_ms", {}).get(k) for k in ("min", "max")]
        row[f"fwd_ms_{mode}"] = t[mode].get("forward_ms", {}).get("median")
    return row


def _table(rows: list[dict]) -> str:
    cols = [("N", "{:>6}"), ("p", "{:>5}"), ("predictor", "{:<13}"), ("recall_min_head", "{:>8.4f}"),
            ("density", "{:>7.3f}"), ("density_vs_oracle", "{:>7}"), ("fallback_heads", "{:>6}"),
            ("attn_x_cudnn", "{:>7}"), ("kernel_x_cudnn", "{:>7}"), ("attn_x_flash", "{:>7}"), ("fwd_x_cudnn", "{:>7}"),
            ("loss_delta", "{:>+9.4f}"), ("dense_layers", "{:>4}"), ("exec_attn_x_cudnn", "{:>7}"),
            ("exec_fwd_x_cudnn", "{:>7}")]
    head = ("     N     p predictor       minrec density   /orcl fallbk | every layer sparse: attn/cuDNN kernel/cuDNN "
            "attn/FLASH fwd/cuDNN dloss | as executed: dense-layers attn/cuDNN fwd/cuDNN")
    lines = [head, "-" * len(head)]
    for r in rows:
        cells = []
        for c, f in cols:
            v = r.get(c)
            if v is None:
                cells.append(f"{'-':>7}")
            elif isinstance(v, float) and c in ("density_vs_oracle", "attn_x_cudnn", "kernel_x_cudnn", "attn_x_flash",
                                                "fwd_x_cudnn", "exec_attn_x_cudnn", "exec_fwd_x_cudnn"):
                cells.append(f"{v:>7.2f}")
            else:
                cells.append(f.format(v))
        lines.append(" ".join(cells))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="HF model folder (default: train/load the reference model)")
    ap.add_argument("--cache", default="runs/lm/stdlib-byte-llama", help="reference-model cache folder")
    ap.add_argument("--seq-lens", default="16384,32768,65536")
    ap.add_argument("--recalls", default="0.9,0.95,0.98")
    ap.add_argument("--predictors", default="", help="comma list (default: the registry's, oracle first)")
    ap.add_argument("--windows", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--time-limit", type=float, default=480.0, help="stop starting new runs after this (s)")
    ap.add_argument("--synthetic", action="store_true", help="also run the synthetic case (sparse_attention.py)")
    ap.add_argument("--out", default="results/prefill.json")
    ap.add_argument("--quick", action="store_true", help="tiny CPU smoke test")
    args = ap.parse_args(argv)

    import torch

    from attnlab.io import write_json
    from attnlab.lm.train import PRESETS, load_or_train
    from attnlab.blocksparse.prefill import (PrefillConfig, heldout_windows, load_causal_model, predictor_names,
                                          run_prefill)

    t_start = time.perf_counter()
    cuda = torch.cuda.is_available() and not args.quick
    device = torch.device("cuda" if cuda else "cpu")
    if args.quick:
        args.seq_lens, args.recalls = "128", "0.9"
        args.windows, args.reps, args.rows, args.block_size = 1, 1, 32, 32
    model = args.model
    train_info = None
    if model is None:
        preset = PRESETS["tiny" if args.quick else "gpu"]
        res = load_or_train(preset, args.cache, log=print)
        model, train_info = str(res.path), res.describe()
    names = [n for n in (args.predictors.split(",") if args.predictors else predictor_names()) if n and n != "full"]
    if "oracle" in names:
        names.remove("oracle")
    names = ["oracle"] + names
    hf = load_causal_model(model, device, torch.bfloat16 if cuda else torch.float32)
    out: dict[str, Any] = {"model": hf.describe(), "train": train_info, "device": torch.cuda.get_device_name() if cuda
                           else "cpu (exact masked path; timings not meaningful)", "torch": torch.__version__,
                           "rows": [], "runs": [], "errors": [], "skipped": []}

    def save() -> None:
        write_json(args.out, out)

    oracle_density: dict[tuple[int, float], float] = {}
    ids_cache: dict[int, Any] = {}
    # p-major order (the middle target first) so that a time limit leaves whole (p, N) blocks, oracle first
    recalls = _floats(args.recalls)
    recalls = sorted(recalls, key=lambda p: abs(p - 0.95))
    for p in recalls:
        for n in _ints(args.seq_lens):
            if n not in ids_cache:
                ids_cache[n] = heldout_windows(hf, n, args.windows)
            for name in names:
                if time.perf_counter() - t_start > args.time_limit:
                    out["skipped"].append({"N": n, "p": p, "predictor": name, "why": "time limit"})
                    continue
                cfg = PrefillConfig(model=model, seq_len=n, predictor=name, recall=p, block_size=args.block_size,
                                    windows=args.windows, rows=args.rows, reps=args.reps, device=str(device))
                t0 = time.perf_counter()
                try:
                    res = run_prefill(cfg, hf=hf, ids=ids_cache[n])
                except Exception as e:  # a predictor failing must not lose the others' numbers
                    out["errors"].append({"N": n, "p": p, "predictor": name, "error": f"{type(e).__name__}: {e}"})
                    print(f"N={n} p={p} {name}: FAILED {type(e).__name__}: {e}", flush=True)
                    save()
                    continue
                if name == "oracle":
                    oracle_density[(n, p)] = res["summary"]["density_predicted_mean"]
                    be = res.get("breakeven")
                    if be:
                        print(f"break-even N={n}: {be['breakeven']:.3f}; " + ", ".join(
                            f"d={c['density']:.2f}: x{c['speedup_vs_cudnn']:.2f}" for c in be["curve"]), flush=True)
                row = _row(res, oracle_density.get((n, p)))
                row["wall_s"] = time.perf_counter() - t0
                out["rows"].append(row)
                res.pop("windows", None)  # per-window layer records are in per_head (means); keep the file small
                out["runs"].append(res)
                print(_table([row]).splitlines()[-1] + f"  ({row['wall_s']:.0f}s)", flush=True)
                save()
    out["rows"].sort(key=lambda r: (r["N"], r["p"], names.index(r["predictor"])))
    print(f"\nTrained model ({out['device']}, causal bf16, {hf.name}):")
    print(_table(out["rows"]))
    if args.synthetic:
        import importlib.util

        spec = importlib.util.spec_from_file_location(
            "sparse_attention", os.path.join(os.path.dirname(os.path.abspath(__file__)), "sparse_attention.py"))
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        syn_out = os.path.splitext(args.out)[0] + "_synthetic.json"
        print("\nSYNTHETIC (planted-structure q/k, not a trained model):", flush=True)
        mod.main(["--quick", "--out", syn_out] if args.quick else
                 ["--ns", "32768", "--cases", "structured", "--causal-ns", "32768", "--extra-ns", "", "--reps", "5",
                  "--time-limit", "60", "--out", syn_out])
        out["synthetic"] = {"file": syn_out, "label": "synthetic planted-structure q/k (benchmarks/sparse_attention.py)"}
    save()
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
