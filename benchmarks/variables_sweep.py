"""Variable creation benchmark: m*(T) of the bounded-norm attention head vs an MLP contrast, law fits, probe.

Default (GPU): balanced sparse AND, s = 3, T = 16 .. 4096 (9 values), 9 seeds; the bounded-norm one-layer
attention head (2 restarts per run, the lowest training loss kept) (the class of the log T theorem; norms projected after each step) and, on the same tasks and
protocol, a ReLU MLP on the flattened bits trained with SGD (T <= 1024); a norm/sample trade-off at T = 256;
the readout-attention probe at the largest T. m* per seed = smallest train size from which every larger
tried size reaches 0.95 test accuracy; m*(T) = median over seeds with a bootstrap CI; fits with bootstrap
CIs over seeds. Targets (printed met / not met):
  1. bounded head: median m*(T) fits a + b log T with R^2 >= 0.9 over T = 16..4096;
  2. contrast: the power-law exponent's 95% interval excludes 0;
  3. probe at the largest T: median (over seeds) readout attention mass on the s relevant positions > 0.5;
  4. wall time < 600 s on one GPU.
Writes the run directory (results.json section 'variables', trials, PNGs) and variables_sweep.json under
--out; results.json is rewritten after every T, so an interrupted run keeps what it finished (--resume).

    PYTHONPATH=src python3 benchmarks/variables_sweep.py --device cuda --out $OUT/variables
    PYTHONPATH=src python3 benchmarks/variables_sweep.py --quick          # CPU smoke run (small T; labelled)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    """Run the sweep, print the tables and the targets; returns a process exit code."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="CPU smoke run: T = 4..64, s = 2, 3 seeds, short training")
    ap.add_argument("--device", default="auto", help="cpu | cuda | auto (default auto)")
    ap.add_argument("--task", default="and", help="and | majority | parity | or | random (default and)")
    ap.add_argument("--s", type=int, default=None, help="relevant bits (default 3; quick 2)")
    ap.add_argument("--T", type=int, nargs="+", default=None, help="context lengths (default 16 32 ... 4096)")
    ap.add_argument("--seeds", type=int, default=None, help="number of seeds (default 9; quick 3)")
    ap.add_argument("--max-steps", type=int, default=None, help="optimiser steps per run (default 2000; quick 150)")
    ap.add_argument("--restarts", type=int, default=None, help="bounded head: inits per (m, seed), lowest train loss kept (default 2; quick 1)")
    ap.add_argument("--no-contrast", action="store_true", help="skip the MLP contrast")
    ap.add_argument("--contrast-max-T", type=int, default=None, help="contrast only up to this T (default 1024; quick 64)")
    ap.add_argument("--norm-sweep", type=float, nargs="*", default=None,
                    help="qk bounds of the trade-off sweep (default 1 2 4 8 16 64; quick 2 16)")
    ap.add_argument("--norm-T", type=int, default=None, help="T of the trade-off sweep (default 256; quick 16)")
    ap.add_argument("--budget-s", type=float, default=None, help="start no new T after this many seconds (default 420)")
    ap.add_argument("--out", default="results/variables_sweep", help="run directory (default results/variables_sweep)")
    ap.add_argument("--resume", action="store_true", help="reuse finished trials in --out")
    args = ap.parse_args(argv)

    import torch

    from attnlab.io import write_json
    from attnlab.variables.complexity import SearchConfig
    from attnlab.variables.ensemble import Bounds, EnsembleConfig
    from attnlab.variables.experiment import SweepConfig, run_sweep

    if args.quick:  # a smoke run small enough for the default test suite
        torch.set_num_threads(1)
        Ts, seeds, steps, n_test = args.T or [4, 8, 16, 32, 64], args.seeds or 3, args.max_steps or 150, 200
        cmax, nsweep, nT = args.contrast_max_T or 64, [2.0, 16.0] if args.norm_sweep is None else args.norm_sweep, args.norm_T or 16
    else:
        Ts, seeds, steps, n_test = args.T or [16, 32, 64, 128, 256, 512, 1024, 2048, 4096], args.seeds or 9, args.max_steps or 2000, 1000
        cmax = args.contrast_max_T or 1024
        nsweep = [1.0, 2.0, 4.0, 8.0, 16.0, 64.0] if args.norm_sweep is None else args.norm_sweep
        nT = args.norm_T or 256
    s_rel = args.s or (2 if args.quick else 3)
    budget = args.budget_s if args.budget_s is not None else (None if args.quick else 420.0)
    torch.backends.cuda.matmul.allow_tf32 = False  # float32 matmuls: the bounded logits are small and exact enough
    restarts = args.restarts or (1 if args.quick else 2)
    bounded = EnsembleConfig(kind="bounded", max_steps=steps, n_test=n_test, bounds=Bounds(), restarts=restarts)
    mlp = EnsembleConfig(kind="mlp", lr=0.05, max_steps=steps, n_test=n_test)
    search = SearchConfig(threshold=0.95, m_min=4 if args.quick else 8, m_max=1024 if args.quick else 65536,
                          rtol=0.1 if args.quick else 0.05, n_boot=1000)
    cfg = SweepConfig(task=args.task, s=s_rel, Ts=Ts, seeds=seeds, bounded=bounded, mlp=mlp, contrast="none" if args.no_contrast else "mlp",
                      contrast_max_T=cmax, search=search, norm_sweep=nsweep, norm_T=nT, budget_s=budget,
                      max_members=96 if args.quick else 512)
    t0 = time.perf_counter()
    sec = run_sweep(cfg, args.out, device=args.device, resume=args.resume, log=lambda s: print(s, flush=True))
    wall = time.perf_counter() - t0
    dev = sec["device"]
    name = torch.cuda.get_device_name() if dev.startswith("cuda") else "cpu"
    label = "CPU SMOKE RUN (small T, short training; not the benchmark numbers)" if args.quick else "benchmark"

    print(f"\n[{label}] {args.task} s={s_rel}, {seeds} seeds, threshold 0.95; device {dev} ({name}); wall {wall:.0f} s")
    for title, block in (("bounded-norm head", sec), ("contrast: MLP on flattened bits", sec.get("contrast") or {})):
        print(f"\n{title}")
        print(f"{'T':>6} {'m*':>8} {'95% CI':>18}  per-seed m*")
        for r in block.get("results", []):
            ms = r["m_star"] if r["m_star"] is not None else f">{r['m_max']}"
            print(f"{r['T']:>6} {str(ms):>8} {str(r['ci']):>18}  {list(r['per_seed'].values())}"
                  f"{'  FLAG ' + r['flag'] if r.get('flag') else ''}")
        f = block.get("fits")
        if f:
            print(f"  log fit: R2 {f['log']['r2']:.3f} CI {f['log']['ci'].get('r2')}, b {f['log']['params']['b']:.3g} "
                  f"CI {f['log']['ci']['b']}; power c {f['power']['params']['c']:.3g} CI {f['power']['ci']['c']}")
            print(f"  verdict: {f['verdict']} - {f['reason']}")
        else:
            print(f"  no fit: {block.get('fit_error')}")
    ns = sec.get("norm_sweep")
    if ns:
        print(f"\nnorm/sample trade-off at T = {ns['T']}:")
        for r in ns["results"]:
            print(f"  qk bound {r['qk_bound']:>6g}: m* {r['m_star']} CI {r['ci']} per seed {list(r['per_seed'].values())}")
    p = sec.get("probe")
    if p:
        print(f"\nprobe at T = {p['T']}: readout mass on relevant per seed {p['mass_per_seed']}, median "
              f"{p['mass_median']:.3f} (uniform {p['uniform_mass']:.4f})")

    fits, cf = sec.get("fits"), (sec.get("contrast") or {}).get("fits")
    Tdone = [r["T"] for r in sec["results"] if r["m_star"] is not None]
    covers = bool(Tdone) and min(Tdone) <= 16 and max(Tdone) >= 4096
    targets = {
        "bounded log fit R2 >= 0.9 over T=16..4096": bool(fits and fits["log"]["r2"] >= 0.9 and covers),
        "contrast exponent CI excludes 0": bool(cf and cf["power"]["ci"]["c"][0] > 0),
        "probe: median readout mass on relevant > 0.5": bool(p and p["mass_median"] > 0.5),
        "wall < 600 s": wall < 600,
    }
    print()
    for k, v in targets.items():
        print(f"  target {k}: {'MET' if v else 'NOT MET'}")
    summary = {"label": label, "device": dev, "device_name": name, "wall_s": wall, "targets": targets, "section": sec}
    out = Path(args.out) / "variables_sweep.json"
    write_json(out, summary)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    sys.exit(main())
