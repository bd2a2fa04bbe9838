"""Reconstruction quality at honest total compute: MiniLM on held-out stdlib docstrings, fit on the fit split.

For each sequence length: (1) the estimator x selection table at one pair budget, with every method's total compute
(exact pairs + proxy at its own rank + projections + row mean + selection + estimator arithmetic, in units of the
dense QK^T multiply-adds); (2) the frontier: worst-layer and mean TV (mean +- sd across groups of held-out windows)
against total compute, one curve per method family; (3) the targets: worst-layer TV <= 0.05 at total compute
<= 0.30, and the best TV at compute 0.25 and 0.5.

    python benchmarks/reconstruct_quality.py --quick             # CPU smoke run (well under a minute idle)
    python benchmarks/reconstruct_quality.py --seq-lens 128 512  # the measured run (tens of minutes on 2 CPU cores)

Prints the tables and writes results/reconstruct_quality.json (results/ is git-ignored).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

TARGET_TV, TARGET_COMPUTE = 0.05, 0.30


def one_length(a, hf, n: int, log) -> dict:
    """Fit, table with compute, frontier and targets at sequence length ``n``."""
    from attnlab.reconstruct.cost import format_cost, method_cost
    from attnlab.reconstruct.evaluate import Combo, evaluate, make_methods
    from attnlab.reconstruct.fit import fit_corpus, windows_for
    from attnlab.reconstruct.frontier import best_at, candidates, evaluate_points, format_frontier, frontier_curves

    t0 = time.perf_counter()
    ranks = sorted(set(a.ranks))
    fit = fit_corpus(hf, a.n_fit, n, a.layers, residual_proxies=[("bilinear", r, 0) for r in ranks])
    t_fit = time.perf_counter() - t0
    windows = windows_for(hf.tokenizer, n, a.n_eval, "heldout", seed=1)
    log(f"[N={n}] fitted on {fit.meta['n_sequences']} windows in {t_fit:.0f} s; {len(windows)} held-out windows")
    # (1) the classic table at one pair budget, each method costed
    combos = [Combo(e, s) for e in a.estimators for s in a.selections
              if not (e.startswith("proxy") and s in ("fixed", "evenly", "leverage"))]
    methods = []
    for r in ranks if a.table_ranks else [ranks[0]]:
        methods += [m for m in make_methods(fit, combos, a.budget, proxy_rank=r)
                    if r == ranks[0] or "[r=" in m.label]
    table = evaluate(hf, windows, methods, a.layers, batch_size=a.batch_size)
    d = hf.head_dim
    for m in methods:
        table[m.label]["cost"] = method_cost(m, d)
    lines = [f"{'method':34s} {'pairs':>6s} {'compute':>8s}  {'maxTV':>6s} {'meanTV':>7s}  breakdown"]
    for lab in sorted(table, key=lambda k: max(v["tv"] for v in table[k]["per_layer"].values())):
        v = table[lab]
        worst = max(x["tv"] for x in v["per_layer"].values())
        lines.append(f"{lab:34s} {v['budget_pairs'] / n:6.3f} {v['cost']['compute']:8.3f}  {worst:6.4f} "
                     f"{v['mean']['tv']:7.4f}  {format_cost(v['cost'])}")
    log(f"\n[N={n}] table at {a.budget} of pairs per row (compute = total / dense QK^T)\n" + "\n".join(lines))
    # (2) the frontier
    pts, skipped = candidates(fit, a.families, a.fractions, ranks, max_compute=a.max_compute)
    log(f"[N={n}] frontier: {len(pts)} points within compute {a.max_compute} ({len(skipped)} more expensive skipped)")
    front = evaluate_points(hf, windows, pts, chunks=a.chunks, batch_size=a.batch_size, layers=a.layers)
    log(format_frontier(front))
    # (3) targets
    targets = {}
    for c in (0.25, TARGET_COMPUTE, 0.5):
        b = best_at(front, c)
        targets[str(c)] = None if b is None else {"method": b, "compute": front[b]["compute"],
                                                  "worst_layer_tv": front[b]["worst_layer_tv"],
                                                  "worst_layer_tv_pooled": front[b]["worst_layer_tv_pooled"],
                                                  "mean_tv": front[b]["mean_tv"]}
    t = targets[str(TARGET_COMPUTE)]
    met = t is not None and t["worst_layer_tv"]["mean"] + t["worst_layer_tv"]["std"] <= TARGET_TV
    log(f"[N={n}] target worst-layer TV <= {TARGET_TV} at compute <= {TARGET_COMPUTE}: "
        + ("no method fits" if t is None else f"{t['method']}: {t['worst_layer_tv']['mean']:.4f} ± "
           f"{t['worst_layer_tv']['std']:.4f} -> {'MET' if met else 'NOT met'}"))
    strip = {k: {kk: vv for kk, vv in v.items() if kk != "per_head"} for k, v in table.items()}
    return {"seq_len": n, "n_fit": int(fit.meta["n_sequences"]), "n_eval": int(len(windows)), "d_head": d,
            "fit_seconds": round(t_fit, 1), "table": strip, "frontier_points": front,
            "frontier": frontier_curves(front), "skipped": skipped, "targets": targets, "target_met": met,
            "seconds": round(time.perf_counter() - t0, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny CPU smoke run: 32 tokens, 8 fit / 4 eval windows, layer 0")
    ap.add_argument("--seq-lens", type=int, nargs="*", default=[128, 512], help="tokens per window")
    ap.add_argument("--n-fit", type=int, default=128, help="fit-split windows")
    ap.add_argument("--n-eval", type=int, default=32, help="held-out windows")
    ap.add_argument("--chunks", type=int, default=4, help="groups of held-out windows (spread across groups)")
    ap.add_argument("--budget", type=float, default=0.25, help="pair budget of the table (fraction per row)")
    ap.add_argument("--ranks", type=int, nargs="*", default=[2, 4, 8], help="proxy ranks")
    ap.add_argument("--table-ranks", action="store_true", help="table rows at every rank (default: the first only)")
    ap.add_argument("--fractions", type=float, nargs="*", default=[1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2],
                    help="pair budgets of the frontier (fractions)")
    ap.add_argument("--families", nargs="*", default=None, help="frontier families (default all)")
    ap.add_argument("--max-compute", type=float, default=1.0, help="skip frontier points above this compute")
    ap.add_argument("--layers", type=int, nargs="*", default=None, help="layers (default all)")
    ap.add_argument("--estimators", nargs="*", default=["gaussian", "basis", "mean", "none", "proxy", "proxy+gaussian"])
    ap.add_argument("--selections", nargs="*", default=["random", "local", "leverage", "qr", "adaptive", "oracle"])
    ap.add_argument("--batch-size", type=int, default=8, help="windows per forward pass")
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (MiniLM from $ATTNLAB_MINILM_DIR when set)")
    ap.add_argument("--out", default="results/reconstruct_quality.json", help="JSON output")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if a.quick:
        a.seq_lens, a.n_fit, a.n_eval, a.chunks, a.layers = [32], 8, 4, 2, a.layers or [0]
        a.ranks, a.fractions = [2], [1 / 8]
        a.families = a.families or ["proxy-only", "topb-proxy", "topb-proxy+gaussian", "gaussian-qr"]
        a.estimators, a.selections = ["none", "proxy"], ["qr", "adaptive"]
    from attnlab.capture.hf import load_model

    t0 = time.perf_counter()
    hf = load_model("minilm", device=a.device)
    import os

    out = {"settings": vars(a), "model_dir": os.environ.get("ATTNLAB_MINILM_DIR", "packaged"),
           "device": torch.cuda.get_device_name(0) if a.device.startswith("cuda") else "cpu", "target": {"worst_layer_tv": TARGET_TV, "compute": TARGET_COMPUTE}, "runs": {}}
    path = Path(a.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    for n in a.seq_lens:
        out["runs"][str(n)] = one_length(a, hf, n, lambda s: print(s, flush=True))
        out["seconds"] = round(time.perf_counter() - t0, 1)
        path.write_text(json.dumps(out, indent=2))  # after each length, so a long run keeps what it has
    print(f"wrote {a.out} ({out['seconds']} s)")


if __name__ == "__main__":
    main()
