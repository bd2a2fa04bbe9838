"""Sparse prefill with an estimated remainder on a trained causal LM (issue 28, items 2 and 3, prefill part).

For each block predictor (``make_block_predictor``) and mass target p, every attention layer of the trained
byte-level Llama runs: the predicted tile pattern (``keep``), the exact attention over the kept tiles
(``masked_out_lse``, float64 on CPU / float32 on GPU: a dense masked reference, not the kernel), then
``add_remainder`` with each remainder method. Per layer it records the output's relative error against exact
dense attention of the same q, k, v (Frobenius over rows, mean over heads), the kept mass (recall), the tile
density, the remainder's and the prediction's multiply-adds as fractions of dense causal attention (QK^T + PV over
causal tiles, the units of density); the forward continues with the merged output, and the window's loss change
(nats/byte) against the dense forward is recorded. Held-out windows of the model's own split; spread over windows
(mean, sd, 95% t-interval); a comparison whose intervals overlap is 'inconclusive'.

Target: at p=0.9 with a remainder, output error and loss change at most half of sparse-only at p=0.9, and at
least as good as sparse-only at p=0.98 (whose density is higher).

CPU: ``PYTHONPATH=src python benchmarks/remainder.py --model runs/lm-rem-2k --seq-len 2048 --block 64``;
``--train`` trains a small model first (tiny preset, longer context) when ``--model`` does not exist.
Writes ``results/remainder.json`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

import torch  # noqa: E402

T975 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26, 10: 2.23, 11: 2.20,
        12: 2.18, 15: 2.13, 20: 2.09, 30: 2.04}


def _t(n: int) -> float:
    return T975.get(n, T975[max(k for k in T975 if k <= n)] if n > 1 else float("nan"))


def spread(xs: list[float]) -> dict[str, float]:
    """Mean, sd and 95% t-interval half-width over windows."""
    xs = [x for x in xs if math.isfinite(x)]  # a window without dropped tiles has no remainder statistic
    if not xs:
        return {"mean": float("nan"), "sd": float("nan"), "ci": float("nan"), "n": 0}
    m = statistics.fmean(xs)
    sd = statistics.stdev(xs) if len(xs) > 1 else float("nan")
    return {"mean": m, "sd": sd, "ci": _t(len(xs) - 1) * sd / math.sqrt(len(xs)) if len(xs) > 1 else float("nan"),
            "n": len(xs)}


def verdict(a: dict, b: dict) -> str:
    """'lower' / 'higher' when a's interval lies below / above b's, else 'inconclusive'."""
    if a["mean"] + a["ci"] < b["mean"] - b["ci"]:
        return "lower"
    if a["mean"] - a["ci"] > b["mean"] + b["ci"]:
        return "higher"
    return "inconclusive"


def train_model(path: str, seq_len: int, seconds: float, preset: str = "tiny") -> None:
    """A preset trained briefly at context seq_len / 2, then seq_len (tiny: CPU, a few minutes; gpu: one GPU)."""
    from attnlab.lm.train import config_from, load_or_train

    extra = {"batch_size": 4} if preset == "tiny" else {}
    cfg = config_from(preset, seq_len=seq_len // 2, long_seq_len=seq_len, long_frac=0.3, steps=1500,
                      max_seconds=seconds, eval_every=0, eval_windows=2 if preset != "tiny" else 4, device="auto",
                      **extra)
    load_or_train(cfg, path, log=print)


def exact_dropped(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor, bs: int, sc: float,
                  dt: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact log mass and mean value of each row's dropped tiles (the remainder an estimator aims at)."""
    from attnlab.blocksparse.remainder import dropped_tiles

    B, H, N, d = q.shape
    g = H // k.shape[1]
    L = torch.full((B, H, N), -math.inf, dtype=dt, device=q.device)
    V = torch.zeros(B, H, N, v.shape[-1], dtype=dt, device=q.device)
    drop = dropped_tiles(keep).expand(B, H, -1, -1)
    for h in range(H):
        m = drop[:, h].repeat_interleave(bs, 1).repeat_interleave(bs, 2)[:, :N, :N]
        s = (q[:, h].to(dt) @ k[:, h // g].to(dt).transpose(-1, -2) * sc).masked_fill(~m, -math.inf)
        L[:, h] = torch.logsumexp(s, -1)
        V[:, h] = torch.nan_to_num(torch.softmax(s, -1), nan=0.0) @ v[:, h // g].to(dt)
    return L, V


class Handler:
    """Attention handler: predicted tiles, exact kept part, remainder ``method``; records per layer."""

    def __init__(self, predictor: Any, p: float, block: int, method: str, n_kv: int, dt: torch.dtype):
        self.pred, self.p, self.block, self.method, self.n_kv, self.dt = predictor, p, block, method, n_kv, dt
        self.records: list[dict] = []

    def __call__(self, call: Any) -> torch.Tensor:
        from attnlab.blocksparse.remainder import (add_remainder, estimate_remainder, masked_out_lse,
                                                   merge_remainder, remainder_cost)

        q, k, v = call.query.to(self.dt), call.key.to(self.dt), call.value.to(self.dt)
        B, H, N, d = q.shape
        g = H // self.n_kv
        k, v = k[:, ::g].contiguous(), v[:, ::g].contiguous()  # the hook repeats kv heads; undo (GQA path)
        bs, sc = self.block, call.scaling
        n_pad = -(-N // bs) * bs
        pad = lambda x: torch.nn.functional.pad(x, (0, 0, 0, n_pad - N))  # noqa: E731
        pred = self.pred.predict(pad(q), pad(k), causal=True, block_size=bs, p=self.p,
                                 scale=sc)
        keep = pred.pattern.block_graph()
        out, lse = masked_out_lse(q, k, v, keep, bs, scale=sc, dtype=self.dt)
        full = torch.ones_like(keep)
        ref, lse_ref = masked_out_lse(q, k, v, full, bs, scale=sc, dtype=self.dt)
        merged = add_remainder(q, k, v, keep, bs, out, lse, self.method, scale=sc)
        rel = lambda x: ((x - ref).flatten(2).norm(dim=-1) / ref.flatten(2).norm(dim=-1)).mean(0)  # noqa: E731
        err = rel(merged)  # (H,)
        diag = {}
        if self.method != "none":  # where the error comes from: the estimated mass or the estimated value
            L_t, V_t = exact_dropped(q, k, v, keep, bs, sc, self.dt)
            L_e, V_e = estimate_remainder(q, k, v, keep, bs, self.method, scale=sc)
            fin = torch.isfinite(L_t)
            diag = {"log_mass_bias": float((L_e - L_t)[fin].mean()), "log_mass_abs": float((L_e - L_t)[fin].abs().mean()),
                    "err_exact_mass": float(rel(merge_remainder(out, lse, L_t, V_e)[0]).mean()),
                    "err_exact_value": float(rel(merge_remainder(out, lse, L_e, V_t)[0]).mean())}
        nq = keep.shape[-1]
        tri = torch.ones(nq, nq, dtype=torch.bool, device=keep.device).tril()
        dens = float((keep & tri).sum() / (keep.shape[0] * H * tri.sum()))
        cost = remainder_cost(keep, bs, N, d, self.method, n_kv_heads=self.n_kv)
        self.records.append({
            "layer": call.layer, "out_error": err.tolist(), "recall": float(torch.exp(lse - lse_ref).mean()),
            "density": dens, "remainder": cost["fraction"], "prediction": float(pred.cost) / cost["dense_macs"], **diag})
        return merged.to(call.query.dtype)


def run(args: argparse.Namespace) -> dict:
    from attnlab.blocksparse.predictors import make_block_predictor
    from attnlab.blocksparse.prefill import prefill_hooks
    from attnlab.blocksparse.prefill.model import heldout_windows, window_loss
    from attnlab.sources.hf import load_model

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dt = torch.float32 if dev == "cuda" else torch.float64
    if not os.path.exists(args.model):
        if not args.train:
            raise SystemExit(f"--model {args.model} does not exist (pass --train to train one)")
        train_model(args.model, args.seq_len, args.train_seconds, args.train_preset)
    hf = load_model(args.model, device=dev, dtype=dt, head="causal-lm")
    n_kv = hf.model.config.num_key_value_heads
    ids = heldout_windows(hf, args.seq_len, args.windows).to(dev)
    dense_loss = []
    with torch.no_grad():
        for w in range(ids.shape[0]):
            dense_loss.append(window_loss(hf.model(input_ids=ids[w:w + 1], use_cache=False).logits, ids[w:w + 1]))
    rows = []
    for name in args.predictors:
        predictor = make_block_predictor(name, flag="--predictors")
        for p in args.p:
            for method in args.methods:
                t0 = time.perf_counter()
                per_w = []
                for w in range(ids.shape[0]):
                    h = Handler(predictor, p, args.block, method, n_kv, dt)
                    with prefill_hooks(hf, h), torch.no_grad():
                        logits = hf.model(input_ids=ids[w:w + 1], use_cache=False).logits
                    per_w.append({"loss_delta": window_loss(logits, ids[w:w + 1]) - dense_loss[w], "layers": h.records})
                L = len(per_w[0]["layers"])
                row = {"predictor": name, "p": p, "method": method, "seconds": round(time.perf_counter() - t0, 1),
                       "loss_delta": spread([x["loss_delta"] for x in per_w]),
                       "loss_delta_windows": [x["loss_delta"] for x in per_w]}
                for key in ("density", "remainder", "prediction", "recall", "log_mass_bias", "log_mass_abs",
                            "err_exact_mass", "err_exact_value"):
                    if key in per_w[0]["layers"][0]:
                        row[key] = spread([statistics.fmean(r[key] for r in x["layers"]) for x in per_w])
                row["out_error_layer"] = [spread([statistics.fmean(x["layers"][li]["out_error"]) for x in per_w])
                                          for li in range(L)]
                row["out_error_mean"] = spread([statistics.fmean(statistics.fmean(r["out_error"]) for r in x["layers"])
                                                for x in per_w])
                row["out_error_windows"] = [statistics.fmean(statistics.fmean(r["out_error"]) for r in x["layers"])
                                            for x in per_w]
                row["compute"] = spread([statistics.fmean(r["density"] + r["remainder"] for r in x["layers"])
                                         for x in per_w])
                rows.append(row)
                print(_line(row), flush=True)
                if args.out:  # partial results survive a time limit
                    _write(args.out, {"partial": True, "seq_len": args.seq_len, "rows": rows})
    return {"model": hf.describe(), "device": dev, "dtype": str(dt), "seq_len": args.seq_len, "block": args.block,
            "windows": args.windows, "dense_loss": spread(dense_loss), "torch": torch.__version__,
            "rows": rows, "targets": targets(rows)}


def _jsonable(x):
    """NaN / inf -> None (JSON has no NaN)."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def _write(path: str, obj: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(_jsonable(obj), f, indent=1, allow_nan=False)


def _fmt(s: dict, f: str = ".4f") -> str:
    return f"{s['mean']:{f}}±{s['ci']:{f}}"


def _line(r: dict) -> str:
    errs = " ".join(_fmt(e, ".3f") for e in r["out_error_layer"])
    return (f"{r['predictor']:>10} p={r['p']:<5} {r['method']:>12} | density {r['density']['mean']:.3f} "
            f"+rem {r['remainder']['mean']:.4f} = {r['compute']['mean']:.3f} (pred {r['prediction']['mean']:.3f}) "
            f"| recall {r['recall']['mean']:.4f} | out err/layer {errs} | loss delta {_fmt(r['loss_delta'])}"
            + (f" | log-mass bias {r['log_mass_bias']['mean']:+.2f} |err| {r['log_mass_abs']['mean']:.2f}; err with "
               f"exact mass {r['err_exact_mass']['mean']:.3f}, exact value {r['err_exact_value']['mean']:.3f}"
               if "log_mass_bias" in r else ""))


def _ratio(a: list[float], b: list[float]) -> dict:
    """Paired per-window ratio a/b (spread over windows)."""
    return spread([x / y if y != 0 else float("nan") for x, y in zip(a, b)])


def targets(rows: list[dict]) -> list[dict]:
    """Per predictor and remainder method: the paired ratios to sparse-only at the low p, and the comparison
    with sparse-only at the high p (error and loss change), with verdicts."""
    by = {(r["predictor"], r["p"], r["method"]): r for r in rows}
    ps = sorted({r["p"] for r in rows})
    out = []
    if len(ps) < 1:
        return out
    lo, hi = ps[0], ps[-1]
    for (name, p, m), r in by.items():
        if p != lo or m == "none" or (name, lo, "none") not in by:
            continue
        base = by[(name, lo, "none")]
        t = {"predictor": name, "p": lo, "method": m,
             "compute": r["compute"]["mean"], "compute_sparse_only": base["compute"]["mean"],
             "error_ratio": _ratio(r["out_error_windows"], base["out_error_windows"]),
             "loss_ratio": _ratio([abs(x) for x in r["loss_delta_windows"]],
                                  [abs(x) for x in base["loss_delta_windows"]])}
        t["halves_error"] = t["error_ratio"]["mean"] + t["error_ratio"]["ci"] <= 0.5
        t["halves_loss"] = t["loss_ratio"]["mean"] + t["loss_ratio"]["ci"] <= 0.5
        if (name, hi, "none") in by and hi != lo:
            top = by[(name, hi, "none")]
            t["compute_high_p"] = top["compute"]["mean"]
            t["error_vs_high_p"] = verdict(r["out_error_mean"], top["out_error_mean"])
            t["loss_vs_high_p"] = verdict(spread([abs(x) for x in r["loss_delta_windows"]]),
                                          spread([abs(x) for x in top["loss_delta_windows"]]))
        out.append(t)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="runs/lm-rem-2k")
    ap.add_argument("--train", action="store_true", help="train the model first if --model does not exist")
    ap.add_argument("--train-seconds", type=float, default=300.0)
    ap.add_argument("--train-preset", default="tiny", help="tiny (CPU) | gpu (the reference model, shorter)")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("--windows", type=int, default=6)
    ap.add_argument("--predictors", type=lambda s: s.split(","), default=["minference", "pooled", "oracle"])
    ap.add_argument("--p", type=lambda s: [float(x) for x in s.split(",")], default=[0.9, 0.98])
    ap.add_argument("--methods", type=lambda s: s.split(","), default=["none", "pooled", "pooled-sub4", "gaussian",
                                                                        "gaussian-rem", "gaussian-rem-r4"])
    ap.add_argument("--out", default="results/remainder.json")
    ap.add_argument("--quick", action="store_true", help="CPU smoke run: a tiny LM trained a few seconds next to "
                    "--out, 256 tokens, 2 windows, the oracle, none/pooled (checks the script, measures nothing)")
    args = ap.parse_args()
    if args.quick:
        base = args.out[:-5] if args.out.endswith(".json") else args.out
        args.model, args.train, args.train_seconds, args.train_preset = base + "-lm", True, 4.0, "tiny"
        args.seq_len, args.block, args.windows = 256, 32, 2
        args.predictors, args.p, args.methods = ["oracle"], [0.9, 0.98], ["none", "pooled"]
        if not args.out.endswith(".json"):
            args.out = os.path.join(args.out, "remainder.json")
    res = run(args)
    print("\ntargets (ratios paired per window, mean ± 95% CI; vs high p: interval comparison):")
    for t in res["targets"]:
        hp = (f" | vs p={max(args.p)} sparse-only (compute {t.get('compute_high_p', float('nan')):.3f}): error "
              f"{t.get('error_vs_high_p')}, |loss| {t.get('loss_vs_high_p')}") if "compute_high_p" in t else ""
        print(f"{t['predictor']:>10} {t['method']:>12}: compute {t['compute']:.3f} (sparse-only "
              f"{t['compute_sparse_only']:.3f}) error ratio {_fmt(t['error_ratio'], '.3f')} loss ratio "
              f"{_fmt(t['loss_ratio'], '.3f')} halves: error {t['halves_error']}, loss {t['halves_loss']}{hp}")
    _write(args.out, res)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
