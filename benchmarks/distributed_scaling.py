"""Tokens/s of `attnlab spectrum` under torchrun with 1 and K processes (GPUs), statistics merged by all-reduce.

  python benchmarks/distributed_scaling.py --device cuda --nproc 1 2 [--model PATH] [--n-sequences 2048]
  python benchmarks/distributed_scaling.py --quick          # CPU/gloo smoke run

Time counted: the streaming capture + statistics + all-reduce (the run's `seconds`), not model loading
or tokenisation, which every rank repeats. Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from attnlab.io import RunDir  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--nproc", type=int, nargs="+", default=[1, 2])
    p.add_argument("--model", default="minilm")
    p.add_argument("--n-sequences", type=int, default=2048)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--sketch-size", type=int, default=0)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=str(ROOT / "results" / "distributed_scaling"))
    args = p.parse_args()
    if args.quick:
        args.n_sequences, args.seq_len, args.batch_size = 16, 32, 4
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1"}
    rows = []
    for k in args.nproc:
        out = Path(args.out) / f"nproc{k}"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(k), "--master-port", "29611",
               "-m", "attnlab", "spectrum", "--device", args.device, "--model", args.model, "--out", str(out),
               "--n-sequences", str(args.n_sequences), "--seq-len", str(args.seq_len), "--batch-size",
               str(args.batch_size), "--sketch-size", str(args.sketch_size), "--no-report"]
        res = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if res.returncode:
            raise SystemExit(f"nproc {k} failed:\n{res.stderr[-4000:]}")
        # RunDir.results() merges timings.json (wall-clock fields) back into results.json's sections.
        spec = RunDir(out).results()["spectrum"]
        tokens = spec["n_sequences"] * spec["seq_len"]
        rows.append({"nproc": k, "seconds": spec["seconds"], "tokens_per_s": tokens / spec["seconds"],
                     "pooled_k90": spec["pooled"]["k90"]})
    base = rows[0]["tokens_per_s"]
    print(f"{args.model}: {args.n_sequences} x {args.seq_len} tokens, batch {args.batch_size}/rank, {args.device}")
    print(f"{'nproc':>5} {'seconds':>8} {'tokens/s':>10} {'scaling':>8} {'pooled k90':>10}")
    for r in rows:
        r["scaling"] = r["tokens_per_s"] / base
        print(f"{r['nproc']:>5} {r['seconds']:>8.2f} {r['tokens_per_s']:>10.0f} {r['scaling']:>7.2f}x {r['pooled_k90']:>10}")
    path = Path(args.out) / "scaling.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
