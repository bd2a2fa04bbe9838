"""GPU experiment: sample complexity m*(T) of sparse Boolean tasks vs context length, log vs power law.

Default: balanced sparse AND, s = 3, T = 16 .. 1024, 3 seeds, one-layer softmax transformer read out
through a CLS token; m* = smallest train size with test accuracy >= 0.95 in at least half the seeds.
Prints the m*(T) table and the winning law and writes results/variables_sweep/ (results.json, trials,
PNGs) plus a summary JSON. Resumable with --resume. ``--quick`` runs a tiny CPU version.

    PYTHONPATH=src python3 benchmarks/variables_sweep.py --device cuda --out $OUT/variables
    PYTHONPATH=src python3 benchmarks/variables_sweep.py --quick --device cpu
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
import types
from pathlib import Path


def _stub_entmax() -> None:
    """Let attnlab.models import where entmax is not installed (softmax-only; entmax use raises)."""
    if importlib.util.find_spec("entmax") is not None:
        return

    def missing(*_a, **_k):
        raise ImportError("entmax is not installed here; this benchmark supports --attention softmax only")

    mod = types.ModuleType("entmax")
    mod.entmax15 = mod.entmax_bisect = mod.sparsemax = missing  # type: ignore[attr-defined]
    sys.modules["entmax"] = mod


def main(argv: list[str] | None = None) -> int:
    """Run the sweep and print the table; returns a process exit code."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny CPU-sized sweep (T = 4..64, 2 seeds, short training)")
    ap.add_argument("--device", default="auto", help="cpu | cuda | auto (default auto)")
    ap.add_argument("--task", default="and", help="parity | and | or | majority | random (default and)")
    ap.add_argument("--s", type=int, default=3, help="relevant bits (default 3)")
    ap.add_argument("--T", type=int, nargs="+", default=None, help="context lengths (default 16 32 ... 1024)")
    ap.add_argument("--seeds", type=int, default=None, help="number of seeds (default 3; quick 2)")
    ap.add_argument("--max-steps", type=int, default=None, help="optimiser steps per trial (default 2000; quick 150)")
    ap.add_argument("--budget-s", type=float, default=None, help="start no new T after this many seconds (default 280)")
    ap.add_argument("--attention", default="softmax", help="softmax | entmax | sparsemax (entmax needs the package)")
    ap.add_argument("--out", default="results/variables_sweep", help="run directory (default results/variables_sweep)")
    ap.add_argument("--resume", action="store_true", help="reuse finished trials in --out")
    args = ap.parse_args(argv)

    _stub_entmax()
    import torch

    from attnlab.variables.complexity import SearchConfig
    from attnlab.variables.experiment import SweepConfig, run_sweep
    from attnlab.variables.train import TrainConfig

    if args.quick:
        Ts, seeds, steps, n_test, budget = args.T or [4, 8, 16, 32, 64], args.seeds or 2, args.max_steps or 150, 200, args.budget_s
        torch.set_num_threads(1)
    else:
        Ts, seeds, steps, n_test = args.T or [16, 32, 64, 128, 256, 512, 1024], args.seeds or 3, args.max_steps or 2000, 1000
        budget = 280.0 if args.budget_s is None else args.budget_s
    torch.backends.cuda.matmul.allow_tf32 = True
    train = TrainConfig(attention=args.attention, max_steps=steps, n_test=n_test, n_val=n_test,
                        eval_every=25 if args.quick else 50, patience=3 if args.quick else 8,
                        d_model=32 if args.quick else 64)
    search = SearchConfig(threshold=0.95, share=0.5, m_min=8 if not args.quick else 4, rtol=0.1 if not args.quick else 0.3)
    cfg = SweepConfig(task=args.task, s=args.s, Ts=Ts, seeds=seeds, train=train, search=search, budget_s=budget)
    t0 = time.perf_counter()
    sec = run_sweep(cfg, args.out, device=args.device, resume=args.resume, log=lambda s: print(s, flush=True))
    wall = time.perf_counter() - t0
    dev = sec["device"]
    name = torch.cuda.get_device_name() if dev.startswith("cuda") else "cpu"

    print(f"\n{args.task} s={args.s}, {seeds} seeds, threshold 0.95 in >= half the seeds; device {dev} ({name})")
    print(f"{'T':>6} {'m*':>6} {'lower':>6}  per-seed smallest m reached   trials  seconds")
    for r in sec["results"]:
        per = ", ".join(f"{k}:{v}" for k, v in r["per_seed"].items())
        print(f"{r['T']:>6} {str(r['m_star']):>6} {r['lower']:>6}  {per:<28} {r['n_trials']:>6} {r['seconds']:>8.1f}")
    if sec.get("skipped_T"):
        print(f"skipped (budget): {sec['skipped_T']}")
    fits = sec.get("fits")
    if fits:
        for law in ("log", "power"):
            f = fits[law]
            ps = ", ".join(f"{k}={v:.3g}" for k, v in f["params"].items())
            print(f"{law:>6}: {ps:<36} SSE={f['sse']:.4g} R2={f['r2']:.3f} AICc={f['aic']:.2f}")
        print(f"winning law: {fits['best']} (delta AICc {fits['delta_aic']:.2f})")
    else:
        print(f"fits skipped: {sec.get('fit_error')}")
    if sec.get("probe"):
        p = sec["probe"]
        print(f"probe T={p['T']} m={p['m']}: readout mass on relevant {p['mass']}, top-s precision {p['topk_precision']}")
    print(f"wall time {wall:.1f}s")
    summary = {"device": dev, "device_name": name, "wall_s": wall, "task": args.task, "s": args.s, "seeds": seeds,
               "results": sec["results"], "fits": fits, "skipped_T": sec.get("skipped_T"), "probe": sec.get("probe")}
    out = Path(args.out) / "variables_sweep.json"
    from attnlab.io import write_json

    write_json(out, summary)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    sys.exit(main())
