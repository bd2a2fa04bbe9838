"""Quality bar of issue 3: MiniLM, 128-token windows, fit on the fit split, evaluate on held-out stdlib docstrings;
at 25% of pairs per row, mean softmax TV per layer for every estimator x selection (+ rel. error, top-1).

    python benchmarks/reconstruct_quality.py            # default settings (~10 min on 2 idle CPU cores)
    python benchmarks/reconstruct_quality.py --quick    # seconds-to-a-minute smoke run

Prints the table and writes results/reconstruct_quality.json (results/ is git-ignored).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny run: 16 fit / 4 eval windows, layers 0 and 5, small grid")
    ap.add_argument("--n-fit", type=int, default=256, help="fit-split windows")
    ap.add_argument("--n-eval", type=int, default=32, help="held-out windows")
    ap.add_argument("--budget", type=float, default=0.25, help="fraction of pairs per row")
    ap.add_argument("--proxy-rank", type=int, default=4, help="adaptive-selection proxy rank r")
    ap.add_argument("--extra-ranks", type=int, nargs="*", default=[8], help="extra proxy ranks for the adaptive rows")
    ap.add_argument("--layers", type=int, nargs="*", default=None, help="layers (default all)")
    ap.add_argument("--estimators", nargs="*", default=None, help="only these estimators (default: the full grid)")
    ap.add_argument("--selections", nargs="*", default=None, help="only these selections (default: the full grid)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("--out", default="results/reconstruct_quality.json", help="JSON output")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from attnlab.capture.hf import load_model
    from attnlab.reconstruct.evaluate import Combo, evaluate, make_methods
    from attnlab.reconstruct.fit import fit_corpus, windows_for
    from attnlab.reconstruct.run import best_label, format_table

    sels = ["random", "fixed", "evenly", "local", "leverage", "qr", "adaptive", "oracle"]
    ests = ["gaussian", "basis", "mean", "none", "proxy", "proxy+gaussian"]
    layers = a.layers
    if a.quick:
        a.n_fit, a.n_eval, layers = 16, 4, layers or [0, 5]
        sels, ests = ["random", "local", "qr", "adaptive", "oracle"], ["gaussian", "basis", "proxy", "proxy+gaussian", "none"]
    sels, ests = a.selections or sels, a.estimators or ests
    ranks = list(dict.fromkeys([a.proxy_rank, *a.extra_ranks]))
    resid = [("bilinear", r, 0) for r in ranks] if "proxy+gaussian" in ests else []
    t0 = time.perf_counter()
    hf = load_model("minilm")
    fit = fit_corpus(hf, a.n_fit, 128, layers, residual_proxies=resid)
    t_fit = time.perf_counter() - t0
    windows = windows_for(hf.tokenizer, 128, a.n_eval, "heldout", seed=1)
    combos = [Combo(e, s) for e in ests for s in sels
              if not (e.startswith("proxy") and s in ("fixed", "evenly", "leverage"))]
    if "gaussian" in ests:
        combos += [Combo("gaussian", s, position=True) for s in ("local", "adaptive") if s in sels]
        combos += [Combo("gaussian", "adaptive", offset="estimate")] if "adaptive" in sels else []
    if "basis" in ests and "random" in sels:
        combos.append(Combo("basis", "random", pool_heads=True))
    kw = dict(proxy_rank=a.proxy_rank)
    methods = make_methods(fit, combos, a.budget, **kw)
    extra = [Combo(e, "adaptive") for e in ("proxy", "gaussian", "proxy+gaussian") if e in ests]
    for rk in ranks[1:]:
        methods += make_methods(fit, extra, a.budget, proxy_rank=rk)
    table = evaluate(hf, windows, methods, layers)
    best = best_label(table)
    text = format_table(table)
    print(text)
    worst = max(v["tv"] for v in table[best]["per_layer"].values())
    print(f"\nbest (lowest worst-layer TV, oracle excluded): {best}  worst-layer TV {worst:.4f}  "
          f"target 0.05 {'MET' if worst < 0.05 else 'NOT met'}; proxy cost r/d_head = {a.proxy_rank}/{hf.head_dim}")
    out = {"settings": vars(a), "n_fit": int(fit.meta["n_sequences"]), "n_eval": int(len(windows)),
           "fit_seconds": round(t_fit, 1), "seconds": round(time.perf_counter() - t0, 1), "best": best,
           "best_worst_layer_tv": worst, "table": {k: {kk: vv for kk, vv in v.items() if kk != "per_head"}
                                                  for k, v in table.items()}}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2))
    print(f"wrote {a.out} ({out['seconds']} s)")


if __name__ == "__main__":
    main()
