"""Training with reconstructed attention (the paper's third experiment): our small transformer on stdlib docstrings
(bytes), next-byte causal LM and masked-byte LM, full attention vs reconstructed attention at pair budgets 0.125 /
0.25 / 0.5, several seeds; held-out loss curves (mean +- sd over seeds) and the final paired gap to full attention.

    python benchmarks/reconstruct_training.py --quick     # CPU smoke run (tiny model, seconds when idle)
    python benchmarks/reconstruct_training.py --device cuda   # the measured run (< 10 min on one H100)

Prints the gap table and writes results/reconstruct_training.json (results/ is git-ignored).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny CPU smoke run: 1 layer, 16 bytes, 6 steps, 2 seeds, budget 0.5")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--objectives", nargs="*", default=["clm", "mlm"])
    ap.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    ap.add_argument("--budgets", type=float, nargs="*", default=[0.125, 0.25, 0.5])
    ap.add_argument("--estimators", nargs="*", default=["proxy"], help="estimators of the unselected pairs")
    ap.add_argument("--selections", nargs="*", default=["adaptive"])
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--n-heads", type=int, default=4)
    ap.add_argument("--n-layers", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--proxy-rank", type=int, default=4)
    ap.add_argument("--refresh", type=int, default=50)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--eval-windows", type=int, default=256)
    ap.add_argument("--out", default="results/reconstruct_training.json")
    a = ap.parse_args()
    kw = dict(objectives=a.objectives, seeds=a.seeds, budgets=a.budgets, estimators=a.estimators,
              selections=a.selections, steps=a.steps, seq_len=a.seq_len, d_model=a.d_model, n_heads=a.n_heads,
              n_layers=a.n_layers, batch_size=a.batch_size, proxy_rank=a.proxy_rank, refresh=a.refresh,
              eval_every=a.eval_every, eval_windows=a.eval_windows, device=a.device, refit_windows=64, lr=3e-3)
    if a.quick:
        kw.update(seeds=a.seeds[:2], steps=6, seq_len=16, d_model=16, n_heads=2, n_layers=1, batch_size=8,
                  budgets=[0.5], refresh=3, eval_every=3, eval_windows=8, proxy_rank=2, refit_windows=8,
                  max_chars=20_000)
    from attnlab.reconstruct.train import format_summary, train_compare

    t0 = time.perf_counter()
    res = train_compare(progress=True, **kw)
    res["seconds"] = round(time.perf_counter() - t0, 1)
    res["device"] = torch.cuda.get_device_name(0) if a.device.startswith("cuda") else "cpu"
    print(format_summary(res["summary"]))
    print(f"device {res['device']}, {res['seconds']} s")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=2))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
