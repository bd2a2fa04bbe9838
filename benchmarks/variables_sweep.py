"""Variable creation benchmark (issue 30): m*(T) of the bounded-norm attention head vs an MLP contrast on several
sparse Boolean tasks, law fits, the attention probe against T and against the norm bound.

Presets (``--preset``):
- ``gpu`` (default): AND and OR with s = 3 and sparse parity with s = 2, T = 16 .. 4096 (9 values), 9 seeds; the
  bounded-norm one-layer attention head (one head; two on parity, because one softmax head's decision is a linear
  threshold function of the bits) and, on the same tasks and protocol, a ReLU MLP on the flattened bits trained
  with SGD (T <= 1024); each task starts no new T after 170 s. Measured on an H200 (2026-12-04, NOTES-variables.md):
  about 125 s reach only T = 16..256 of the bounded head (8.6 to 57 s per T; tiny models are latency-bound), so
  T = 4096 needs roughly an hour per task, not the 170 s budgeted here.
- ``cpu``: the budgeted CPU sweep, T = 8 .. 128, 9 seeds, 800 steps, 1 restart, a coarse search (4 doubling
  sizes, 2 refinement points, rtol 0.25). Measured on 2 shared cores: AND about 8 min of CPU, OR about 2.5;
  parity (2 heads) is optimisation-limited and took 7 min for T = 8 and 16 alone. Numbers:
  benchmarks/NOTES-variables.md.
- ``quick`` (= ``--quick``): CPU smoke run, AND s = 2, T = 4 .. 64, 3 seeds (the default test suite runs it).

Every trial fits its training set or is retrained (restarts, same step budget) and only fitting trials count
towards m*; each trial records the readout attention mass on the relevant positions. m* per seed = smallest train
size from which every larger tried size reaches 0.95 test accuracy; m*(T) = median over seeds with a bootstrap CI;
fits with bootstrap CIs over seeds. Per task the targets printed are the issue's: bounded head log fit R^2 >= 0.9
over the whole T range, its power exponent's CI narrower than 0.25, the contrast's exponent CI above 0.5; overall:
every target on at least two tasks, wall < 600 s. The probe against the bound trains every seed at the largest
reached T and m = 2 m* under each qk bound and prints the mass beside the cap the bound puts on it.

Each task writes its run directory ``--out/<task>_s<s>`` (results.json section 'variables', trials, PNGs); results
are rewritten after every T, so an interrupted run keeps what it finished (``--resume``).

    PYTHONPATH=src python3 benchmarks/variables_sweep.py --device cuda --out $OUT/variables
    PYTHONPATH=src python3 benchmarks/variables_sweep.py --preset cpu --device cpu --out runs/vars_cpu --resume
    PYTHONPATH=src python3 benchmarks/variables_sweep.py --quick          # CPU smoke run (small T; labelled)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


PRESETS = {  # Ts, seeds, max_steps, n_test, contrast max T, norm-sweep bounds, norm T, probe bounds
    "gpu": dict(Ts=[16, 32, 64, 128, 256, 512, 1024, 2048, 4096], seeds=9, steps=2000, n_test=1000, cmax=1024,
                nsweep=[], nT=256, pbounds=[1.0, 2.0, 4.0, 8.0, 16.0, 64.0], restarts=2, doubling=8, points=4,
                rtol=0.05, m_min=8, m_max=65536, budget=170.0),
    "cpu": dict(Ts=[8, 16, 32, 64, 128], seeds=9, steps=800, n_test=500, cmax=128, nsweep=[], nT=128,
                pbounds=[1.0, 2.0, 4.0, 8.0, 16.0], restarts=1, doubling=4, points=2, rtol=0.25, m_min=8,
                m_max=8192, budget=None),
    "quick": dict(Ts=[4, 8, 16, 32, 64], seeds=3, steps=150, n_test=200, cmax=64, nsweep=[2.0, 16.0], nT=16,
                  pbounds=[2.0, 16.0], restarts=1, doubling=8, points=4, rtol=0.1, m_min=4, m_max=1024, budget=None),
}
DEFAULT_TASKS = {"gpu": "and:3,or:3,parity:2", "cpu": "and:3,or:3,parity:2", "quick": "and:2"}


def parse_tasks(spec: str) -> list[tuple[str, int]]:
    """'and:3,or:3,parity:2' -> [('and', 3), ('or', 3), ('parity', 2)]."""
    out = []
    for part in spec.replace(" ", "").split(","):
        name, _, s = part.partition(":")
        if not name or not s.isdigit():
            raise SystemExit(f"--tasks: {part!r} is not TASK:S (e.g. and:3)")
        out.append((name, int(s)))
    return out


def print_block(title: str, block: dict) -> None:
    """m*(T) table and fits of one learner."""
    from attnlab.textfmt import interval

    print(f"\n{title}")
    print(f"{'T':>6} {'m*':>8} {'95% CI':>18} {'fit':>5} {'mass':>6}  per-seed m*")
    for r in block.get("results", []):
        ms = r["m_star"] if r["m_star"] is not None else f">{r['m_max']}"
        mass = (r.get("attn") or {}).get("mass_median")
        print(f"{r['T']:>6} {str(ms):>8} {interval(r['ci']):>18} {r.get('fit_rate', 1):>5.2f} "
              f"{'' if mass is None else f'{mass:.3f}':>6}  {list(r['per_seed'].values())}"
              f"{'  FLAG ' + r['flag'] if r.get('flag') else ''}")
    f = block.get("fits")
    if f:
        ci = f["log"]["ci"]
        print(f"  log fit: R2 {f['log']['r2']:.3f} CI {interval(ci.get('r2'))}, b {f['log']['params']['b']:.3g} "
              f"CI {interval(ci['b'])}; power c {f['power']['params']['c']:.3g} CI {interval(f['power']['ci']['c'])}")
        print(f"  verdict: {f['verdict']} - {f['reason']}")
    else:
        print(f"  no fit: {block.get('fit_error')}")


def task_targets(sec: dict, Ts: list[int]) -> dict[str, bool]:
    """The issue's per-task targets: log fit R^2 >= 0.9 and power exponent CI width < 0.25 for the bounded head
    over the whole T range, contrast exponent CI above 0.5."""
    fits, cf = sec.get("fits"), (sec.get("contrast") or {}).get("fits")
    Tdone = [r["T"] for r in sec["results"] if r["m_star"] is not None]
    covers = bool(Tdone) and min(Tdone) <= min(Ts) and max(Tdone) >= max(Ts)
    c = fits["power"]["ci"]["c"] if fits else [float("-inf"), float("inf")]
    return {
        "bounded log R2 >= 0.9 over the T range": bool(fits and fits["log"]["r2"] >= 0.9 and covers),
        "bounded power exponent CI width < 0.25": bool(fits and c[1] - c[0] < 0.25),
        "contrast exponent CI above 0.5": bool(cf and cf["power"]["ci"]["c"][0] > 0.5),
    }


def main(argv: list[str] | None = None) -> int:
    """Run the sweep of every task, print the tables and the targets; returns a process exit code."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="CPU smoke run: T = 4..64, and s = 2, 3 seeds, short training")
    ap.add_argument("--preset", choices=sorted(PRESETS), default=None,
                    help="gpu (default; T = 16..4096, 9 seeds) | cpu (the budgeted CPU sweep: T = 8..128, 9 seeds, "
                         "short search) | quick (= --quick)")
    ap.add_argument("--device", default="auto", help="cpu | cuda | auto (default auto)")
    ap.add_argument("--tasks", default=None, help="TASK:S list (default and:3,or:3,parity:2; quick and:2); parity "
                                                  "trains --parity-heads heads")
    ap.add_argument("--parity-heads", type=int, default=2,
                    help="heads of the bounded model on parity (default 2: one softmax head's decision is a linear "
                         "threshold function of the bits, which cannot be parity)")
    ap.add_argument("--T", type=int, nargs="+", default=None, help="context lengths (default: the preset's)")
    ap.add_argument("--seeds", type=int, default=None, help="number of seeds (default 9; quick 3)")
    ap.add_argument("--max-steps", type=int, default=None, help="optimiser steps per attempt (default: the preset's)")
    ap.add_argument("--restarts", type=int, default=None, help="re-initialisations of an unfit trial (default: preset)")
    ap.add_argument("--no-contrast", action="store_true", help="skip the MLP contrast")
    ap.add_argument("--contrast-max-T", type=int, default=None, help="contrast only up to this T (default: preset)")
    ap.add_argument("--norm-sweep", type=float, nargs="*", default=None, help="qk bounds of the m* trade-off sweep")
    ap.add_argument("--norm-T", type=int, default=None, help="T of the trade-off sweep")
    ap.add_argument("--probe-bounds", type=float, nargs="*", default=None,
                    help="qk bounds of the attention probe against the norm bound (at the largest reached T)")
    ap.add_argument("--budget-s", type=float, default=None, help="per task: start no new T after this many seconds")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's; quick 1)")
    ap.add_argument("--out", default="results/variables_sweep", help="run directory (default results/variables_sweep)")
    ap.add_argument("--resume", action="store_true", help="reuse finished trials in --out")
    args = ap.parse_args(argv)

    import torch

    from attnlab.io import write_json
    from attnlab.variables.complexity import SearchConfig
    from attnlab.variables.ensemble import Bounds, EnsembleConfig
    from attnlab.variables.experiment import SweepConfig, run_sweep

    preset = "quick" if args.quick else (args.preset or "gpu")
    P = PRESETS[preset]
    threads = args.threads or (1 if preset == "quick" else None)
    if threads:
        torch.set_num_threads(threads)
    Ts, seeds = args.T or P["Ts"], args.seeds or P["seeds"]
    steps, n_test = args.max_steps or P["steps"], P["n_test"]
    cmax = args.contrast_max_T or P["cmax"]
    nsweep = P["nsweep"] if args.norm_sweep is None else args.norm_sweep
    pbounds = P["pbounds"] if args.probe_bounds is None else args.probe_bounds
    budget = args.budget_s if args.budget_s is not None else P["budget"]
    restarts = P["restarts"] if args.restarts is None else args.restarts
    torch.backends.cuda.matmul.allow_tf32 = False  # float32 matmuls: the bounded logits are small and exact enough
    label = {"quick": "CPU SMOKE RUN (small T, short training; not the benchmark numbers)",
             "cpu": "CPU BUDGETED SWEEP (T <= 128, short search; not the GPU benchmark)", "gpu": "benchmark"}[preset]
    summary: dict = {"label": label, "preset": preset, "tasks": {}}
    t_all = time.perf_counter()
    for task, s_rel in parse_tasks(args.tasks or DEFAULT_TASKS[preset]):
        heads = args.parity_heads if task == "parity" else 1
        bounded = EnsembleConfig(kind="bounded", n_heads=heads, max_steps=steps, n_test=n_test, bounds=Bounds(),
                                 restarts=restarts)
        mlp = EnsembleConfig(kind="mlp", lr=0.05, max_steps=steps, n_test=n_test, restarts=restarts)
        search = SearchConfig(threshold=0.95, m_min=P["m_min"], m_max=P["m_max"], rtol=P["rtol"], n_boot=1000,
                              doubling=P["doubling"], points=P["points"])
        cfg = SweepConfig(task=task, s=s_rel, Ts=Ts, seeds=seeds, bounded=bounded, mlp=mlp,
                          contrast="none" if args.no_contrast else "mlp", contrast_max_T=cmax, search=search,
                          norm_sweep=nsweep, norm_T=args.norm_T or P["nT"], budget_s=budget,
                          probe_bounds=pbounds, max_members=96 if preset != "gpu" else 512)
        out = Path(args.out) / f"{task}_s{s_rel}"
        t0 = time.perf_counter()
        sec = run_sweep(cfg, out, device=args.device, resume=args.resume, log=lambda x: print(x, flush=True))
        wall = time.perf_counter() - t0
        dev = sec["device"]
        name = torch.cuda.get_device_name() if dev.startswith("cuda") else "cpu"
        print(f"\n[{label}] {task} s={s_rel}, {heads} head(s), {seeds} seeds, threshold 0.95; device {dev} ({name}); "
              f"wall {wall:.0f} s")
        print_block("bounded-norm head", sec)
        print_block("contrast: MLP on flattened bits", sec.get("contrast") or {})
        pb = sec.get("probe_bounds")
        if pb:
            print(f"\nattention probe vs qk bound at T = {pb['T']}, m = {pb['m']} (uniform {pb['uniform_mass']:.4f}):")
            for r in pb["results"]:
                print(f"  qk <= {r['qk_bound']:>5g}: mass median {r['mass_median']:.3f} (seeds {r['mass_min']:.3f}-"
                      f"{r['mass_max']:.3f}), cap {r['cap']:.3f}, test acc {r['test_acc_median']:.3f}, "
                      f"fit {r['fit_rate']:.2f}")
        targets = task_targets(sec, Ts)
        for k, v in targets.items():
            print(f"  target {k}: {'MET' if v else 'NOT MET'}")
        summary["tasks"][f"{task}_s{s_rel}"] = {"device": dev, "device_name": name, "wall_s": wall,
                                                "targets": targets, "section": sec}
    wall = time.perf_counter() - t_all
    met = sum(all(t["targets"].values()) for t in summary["tasks"].values())
    summary["wall_s"] = wall
    summary["targets"] = {"every target on at least two tasks": met >= 2, "wall < 600 s": wall < 600}
    print()
    for k, v in summary["targets"].items():
        print(f"  target {k}: {'MET' if v else 'NOT MET'} ({met} task(s) meet all)" if "two" in k else
              f"  target {k}: {'MET' if v else 'NOT MET'} ({wall:.0f} s)")
    out = Path(args.out) / "variables_sweep.json"
    write_json(out, summary)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    sys.exit(main())
