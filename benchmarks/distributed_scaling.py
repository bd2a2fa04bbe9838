"""Throughput of attnlab's heavy workloads under torchrun with 1 and K processes (GPUs), results merged exactly.

  python benchmarks/distributed_scaling.py --device cuda --nproc 1 2 --workload spectrum prefill
  python benchmarks/distributed_scaling.py --quick          # CPU/gloo smoke run of every workload

Workloads (``--workload``, several allowed):
  spectrum  `attnlab spectrum`: windows sharded, streaming statistics merged by an exact all-reduce;
            work unit = tokens. Default size: 1024 x 512 tokens of MiniLM, all heads (then --min-seconds).
  prefill   `attnlab sparsity prefill` on the trained reference LM (`attnlab lm train` preset 'gpu', cached under
            --cache; an untrained 'tiny' one in --quick): held-out windows sharded, per-head records gathered;
            work unit = windows. Default size: 32 windows of 16384 tokens.
  variables `attnlab variables sweep` (bounded-norm head, no contrast/probe): each search round's (m, seed) trials
            sharded; work unit = trials. Default: T = 64..2048, 8 seeds, m up to 65536.
  reconstruct `attnlab reconstruct run` (no budget sweep, no drop-in): fit windows sharded with float64 sums
            all-reduced, then held-out batches sharded with metric sums merged; work unit = fit + held-out windows.
            Default: MiniLM, 128 fit + 32 held-out windows of 128 tokens (then --min-seconds), on --device.
  sparsity  `attnlab sparsity run` (Sparsefinder, default predictors): gold-graph capture, evaluation and downstream
            windows sharded, learned predictors fitted data-parallel (all-reduced gradients); work unit = fit +
            evaluation windows. Timed: `sharded_seconds` (capture + fit + sweep + downstream; the entmax fine-tune
            is cached by rank 0 and excluded). Default: MiniLM fine-tuned for entmax (cached under $ATTNLAB_CACHE),
            128-token windows, --sp-n-fit / --sp-n-eval / --sp-n-down windows; --quick: our tiny small model.
            Predictor fitting and the sweep run on CPU even with --device cuda (torchrun sets OMP_NUM_THREADS=1 per
            process, so each rank fits on one core); per-rank capture/fit/sweep/downstream seconds are kept.

Time counted: each run's own timed section (`seconds`: streaming + merge), not process start, imports, model
loading, tokenisation or compilation warm-up, which every rank repeats. ``--min-seconds S`` (default 30 on CUDA):
when a workload's first one-process run has less than S s of timed work, its size is scaled up (spectrum
sequences, prefill windows then repetitions, reconstruct windows, variables seeds) and the scaled size is what every row measures;
the JSON records the factor. Prints a table (with each rank's share of the time where the run reports it),
writes JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from attnlab.io import RunDir, read_json, write_json  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(k: int, args: list[str], env: dict[str, str]) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(k), "--master-port",
           str(_free_port()), "-m", "attnlab", *args]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if res.returncode:
        raise SystemExit(f"nproc {k} failed: {' '.join(args[:2])}\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}")


def spectrum(a: argparse.Namespace, k: int, out: Path, env: dict[str, str]) -> dict[str, Any]:
    """`attnlab spectrum`: tokens/s of the streaming capture + statistics + all-reduce."""
    _torchrun(k, ["spectrum", "--device", a.device, "--model", a.model, "--out", str(out), "--n-sequences",
                  str(a.n_sequences), "--seq-len", str(a.seq_len), "--batch-size", str(a.batch_size),
                  *(["--corpus", a.corpus] if a.corpus else []),
                  "--sketch-size", "0", "--no-report"], env)
    # RunDir.results() merges timings.json (wall-clock fields) back into results.json's sections.
    spec = RunDir(out).results()["spectrum"]
    return {"seconds": spec["seconds"], "work": spec["n_sequences"] * spec["seq_len"], "unit": "tokens",
            "check": {"pooled_k90": spec["pooled"]["k90"]}}


def _lm(a: argparse.Namespace) -> str:
    """The prefill model: --lm, else the reference LM trained (or found cached) under --cache; --quick: an
    untrained 'tiny' LM (a smoke test of the plumbing, saved without training to keep the default suite short)."""
    if a.lm:
        return a.lm
    from attnlab.lm.train import PRESETS, build_model, load_or_train, save_model

    if a.quick:
        import dataclasses

        cfg = PRESETS["tiny"]
        path = Path(a.out) / "untrained_tiny_lm"
        save_model(build_model(cfg), path, {"key": cfg.key(), "config": dataclasses.asdict(cfg), "train_loss": 0.0,
                                            "heldout_loss": 0.0, "steps": 0, "train_seconds": 0.0})
        return str(path)
    return str(load_or_train(PRESETS["gpu"], Path(a.cache) / "gpu", log=print).path)


def prefill(a: argparse.Namespace, k: int, out: Path, env: dict[str, str]) -> dict[str, Any]:
    """`attnlab sparsity prefill`: held-out windows/s (measure forward + timed forwards per window and mode)."""
    path = out / "prefill.json"
    _torchrun(k, ["sparsity", "prefill", "--model", a.lm_path, "--seq-len", str(a.prefill_seq_len), "--windows",
                  str(a.windows), "--predictor", a.predictor, "--block-size", str(a.block_size), "--rows",
                  str(a.rows), "--reps", str(a.reps), "--device", "auto" if a.device == "cuda" else a.device,
                  "--out", str(path)], env)
    res = read_json(path)
    s = res["summary"]
    return {"seconds": res["seconds"], "work": len(res["windows"]), "unit": "windows", "ranks": res.get("ranks"),
            "check": {"recall_min_head": s["recall_min_head"], "loss_delta": s["loss_delta"]}}


def variables(a: argparse.Namespace, k: int, out: Path, env: dict[str, str]) -> dict[str, Any]:
    """`attnlab variables sweep` (bounded-norm head, no contrast, no probe): trials/s of the m*(T) search."""
    Ts = [x for t in a.var_T for x in ("--T", str(t))]
    _torchrun(k, ["variables", "sweep", *Ts, "--seeds", str(a.var_seeds), "--m-max", str(a.var_m_max),
                  "--max-steps", str(a.var_max_steps), "--n-test", str(a.var_n_test), "--contrast", "none",
                  "--no-probe", "--device", a.device, "--out", str(out)], env)
    sec = RunDir(out).results()["variables"]
    trials = read_json(out / "variables_trials.json")["trials"]
    return {"seconds": sec["sweep_seconds"], "work": len(trials), "unit": "trials",
            "check": {"m_star": [r["m_star"] for r in sec["results"]]}}


def reconstruct(a: argparse.Namespace, k: int, out: Path, env: dict[str, str]) -> dict[str, Any]:
    """`attnlab reconstruct run`: held-out + fit windows/s of the sharded fit and evaluation."""
    extra = ["--layers", "0", "--heads", "0-1", "--estimators", "gaussian,none", "--selections", "random,adaptive",
             "--no-position", "--no-pooled-baseline"] if a.quick else []
    _torchrun(k, ["reconstruct", "run", "--device", a.device, "--model", a.model, "--seq-len", str(a.rec_seq_len), "--n-fit",
                  str(a.rec_n_fit), "--n-eval", str(a.rec_n_eval), "--budgets", "", "--no-dropin", "--quiet", *extra,
                  "--out", str(out)], env)
    sec = RunDir(out).results()["reconstruct"]
    return {"seconds": sec["sharded_seconds"], "work": a.rec_n_fit + sec["n_eval"], "unit": "windows",
            "check": {"best": sec["best"], "best_worst_layer_tv": sec["best_worst_layer_tv"]}}


def sparsity(a: argparse.Namespace, k: int, out: Path, env: dict[str, str]) -> dict[str, Any]:
    """`attnlab sparsity run`: fit + evaluation windows/s of the sharded capture, data-parallel fit, sweep and
    downstream (model preparation excluded)."""
    if a.quick:  # our small entmax model, trained in ~1 s (sparsemax: sparse gold graphs even after few steps)
        model = ["--model", "small", "--objective", "clm", "--seq-len", "24", "--vocab-size", "256", "--d-model", "32",
                 "--n-heads", "2", "--n-layers", "2", "--alpha", "2", "--steps", "150", "--lr", "0.005",
                 "--batch-size", "8", "--max-windows", "64"]
    else:
        model = ["--model", a.sp_model, "--hf-seq-len", str(a.sp_seq_len), "--hf-finetune-steps",
                 str(a.sp_finetune_steps)]
    _torchrun(k, ["sparsity", "run", *model, "--n-fit", str(a.sp_n_fit), "--n-eval", str(a.sp_n_eval), "--n-down",
                  str(a.sp_n_down), "--epochs", str(a.sp_epochs), "--device", a.device, "--no-resume", "--quiet",
                  "--out", str(out)], env)
    sec = RunDir(out).results()["sparsity"]
    windows = [r["windows"] for r in sec["ranks"]]
    parts = ("capture_seconds", "fit_seconds", "sweep_seconds", "downstream_seconds")
    return {"seconds": sec["sharded_seconds"], "work": sum(w["fit"] + w["eval"] for w in windows), "unit": "windows",
            "ranks": [{"rank": r["rank"], "windows": r["windows"], **{p: round(r[p], 3) for p in parts}}
                      for r in sec["ranks"]],
            "check": {"recall_at_0.9": {m: None if v is None else round(v, 4)
                                        for m, v in sec["recall_at_0.9"].items()}}}


#: sparsity default size: MiniLM windows of 128 tokens (see the module docstring for how it was sized)
SP_DEFAULT = {"n_fit": 32, "n_eval": 16, "n_down": 16}


WORKLOADS: dict[str, Callable[[argparse.Namespace, int, Path, dict[str, str]], dict[str, Any]]] = {
    "spectrum": spectrum, "prefill": prefill, "variables": variables, "reconstruct": reconstruct, "sparsity": sparsity}

MAX_PREFILL_WINDOWS = 32  # the reference LM's held-out split (Python 3.12 stdlib) holds 35 windows of 16384 bytes


def _scale_windows(a: argparse.Namespace, f: float) -> None:
    """More windows up to the held-out split's size, then more timed repetitions per window and mode."""
    w = max(a.windows, min(MAX_PREFILL_WINDOWS, int(a.windows * f)))
    a.reps = max(a.reps, math.ceil(a.reps * f * a.windows / w))
    a.windows = w


#: How to make a workload's timed work f times larger (``--min-seconds``).
SCALERS: dict[str, Callable[[argparse.Namespace, float], None]] = {
    "spectrum": lambda a, f: setattr(a, "n_sequences", int(a.n_sequences * f)),
    "prefill": _scale_windows,
    "variables": lambda a, f: setattr(a, "var_seeds", int(a.var_seeds * f)),
    "reconstruct": lambda a, f: (setattr(a, "rec_n_fit", int(a.rec_n_fit * f)),
                                 setattr(a, "rec_n_eval", int(a.rec_n_eval * f))),
    "sparsity": lambda a, f: [setattr(a, n, int(getattr(a, n) * f)) for n in ("sp_n_fit", "sp_n_eval", "sp_n_down")],
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workload", nargs="+", choices=sorted(WORKLOADS), default=None,
                   help="workloads to scale (default: spectrum, or every workload with --quick)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--nproc", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeats", type=int, default=1, help="runs per (workload, nproc): median and spread")
    # spectrum
    p.add_argument("--model", default="minilm")
    p.add_argument("--n-sequences", type=int, default=1024)
    p.add_argument("--corpus", default=None, help="spectrum: text corpus (default: stdlib docstrings, 560 windows of "
                                                  "512 tokens, about 2.4 s on one H200: too little for 30 s)")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=32)
    # prefill
    p.add_argument("--lm", default=None, help="prefill: causal LM folder (default: train/cache the reference LM)")
    p.add_argument("--cache", default=str(ROOT / "results" / "lm"))
    p.add_argument("--prefill-seq-len", type=int, default=16384)
    p.add_argument("--windows", type=int, default=32)
    p.add_argument("--predictor", default="pooled")
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--rows", type=int, default=256)
    p.add_argument("--reps", type=int, default=3)
    # reconstruct (MiniLM, --model)
    p.add_argument("--rec-seq-len", type=int, default=128)
    p.add_argument("--rec-n-fit", type=int, default=128)
    p.add_argument("--rec-n-eval", type=int, default=32)
    # sparsity (MiniLM fine-tuned for entmax, cached; CPU fitting)
    p.add_argument("--sp-model", default="minilm", help="sparsity: HF model with entmax swapped in")
    p.add_argument("--sp-seq-len", type=int, default=128)
    p.add_argument("--sp-finetune-steps", type=int, default=30)
    p.add_argument("--sp-n-fit", type=int, default=SP_DEFAULT["n_fit"])
    p.add_argument("--sp-n-eval", type=int, default=SP_DEFAULT["n_eval"])
    p.add_argument("--sp-n-down", type=int, default=SP_DEFAULT["n_down"])
    p.add_argument("--sp-epochs", type=int, default=20)
    # variables
    p.add_argument("--var-T", type=int, nargs="+", default=[64, 128, 256, 512, 1024, 2048])
    p.add_argument("--var-seeds", type=int, default=8)
    p.add_argument("--var-m-max", type=int, default=65536)
    p.add_argument("--var-max-steps", type=int, default=1500)
    p.add_argument("--var-n-test", type=int, default=1000)
    p.add_argument("--min-seconds", type=float, default=None,
                   help="scale a workload up when its first 1-process run times less (default: 30 on cuda, 0 on cpu)")
    p.add_argument("--quick", action="store_true", help="CPU/gloo smoke run at tiny sizes")
    p.add_argument("--out", default=str(ROOT / "results" / "distributed_scaling"))
    a = p.parse_args()
    if a.quick:
        a.device = "cpu"
        a.n_sequences, a.seq_len, a.batch_size = 16, 32, 4
        a.prefill_seq_len, a.windows, a.block_size, a.rows, a.reps = 64, 4, 16, 16, 1
        a.rec_seq_len, a.rec_n_fit, a.rec_n_eval = 32, 4, 4
        a.var_T, a.var_seeds, a.var_m_max, a.var_max_steps, a.var_n_test = [4, 8], 2, 64, 40, 64
        a.sp_n_fit, a.sp_n_eval, a.sp_n_down, a.sp_epochs = 11, 7, 5, 2
    workloads = a.workload or (sorted(WORKLOADS) if a.quick else ["spectrum"])
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "HF_HUB_OFFLINE": "1"}
    if "prefill" in workloads:
        a.lm_path = _lm(a)
    out_root = Path(a.out)
    report: dict[str, Any] = {"args": vars(a), "device": a.device, "workloads": {}}
    min_s = a.min_seconds if a.min_seconds is not None else (30.0 if a.device.startswith("cuda") else 0.0)

    def timed(w: str, k: int, r: int, tag: str = "") -> dict[str, Any]:
        t0 = time.perf_counter()
        res = WORKLOADS[w](a, k, out_root / w / f"nproc{k}{tag}" / f"rep{r}", env)
        res["launch_s"] = round(time.perf_counter() - t0, 2)
        res["throughput"] = res["work"] / res["seconds"]
        return res

    for w in workloads:
        rows, scaled = [], None
        first = None
        try:
            if min_s > 0 and w in SCALERS:  # one probe at the given size; scale up when it is too short
                first = timed(w, a.nproc[0], 0, "_probe")
                if first["seconds"] < min_s:
                    f = min(16.0, 1.15 * min_s / max(first["seconds"], 1e-3))
                    SCALERS[w](a, f)
                    scaled = {"factor": round(f, 3), "probe_seconds": first["seconds"], "probe_work": first["work"]}
                    first = None
            for k in a.nproc:
                runs = []
                for r in range(a.repeats):
                    runs.append(first if (first is not None and k == a.nproc[0] and r == 0) else timed(w, k, r))
                tp = [x["throughput"] for x in runs]
                rows.append({"nproc": k, "unit": runs[0]["unit"], "work": runs[0]["work"], "runs": runs,
                             "seconds_median": statistics.median(x["seconds"] for x in runs),
                             "throughput_median": statistics.median(tp), "throughput_min": min(tp),
                             "throughput_max": max(tp)})
        except SystemExit as e:  # one workload failing must not lose the others' rows
            print(f"{w}: FAILED\n{e}")
            report.setdefault("failed", {})[w] = str(e)[-3000:]
            write_json(out_root / "scaling.json", report)
            continue
        base = rows[0]["throughput_median"]
        for r in rows:
            r["scaling"] = r["throughput_median"] / base
        report["workloads"][w] = rows
        report.setdefault("scaled", {})[w] = scaled
        print(f"{w}: {rows[0]['work']} {rows[0]['unit']} on {a.device}, {a.repeats} run(s) per row"
              + (f" (scaled x{scaled['factor']} after a {scaled['probe_seconds']:.1f} s probe)" if scaled else ""))
        print(f"{'nproc':>5} {'seconds':>8} {'per s':>10} {'min':>10} {'max':>10} {'scaling':>8}  check")
        for r in rows:
            print(f"{r['nproc']:>5} {r['seconds_median']:>8.2f} {r['throughput_median']:>10.1f} "
                  f"{r['throughput_min']:>10.1f} {r['throughput_max']:>10.1f} {r['scaling']:>7.2f}x  "
                  f"{json.dumps(r['runs'][0]['check'])}")
            for rk in r["runs"][0].get("ranks") or []:
                print(f"      rank {rk['rank']}: " + ", ".join(f"{k} {v}" for k, v in rk.items() if k != "rank"))
        write_json(out_root / "scaling.json", report)  # after every workload: a later failure keeps these rows
    path = write_json(out_root / "scaling.json", report)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
