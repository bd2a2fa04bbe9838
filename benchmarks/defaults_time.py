"""Wall time of every command at its defaults (issue 29: each within 3 minutes on an idle 2-core CPU, the demo in 5).

Each command runs in a fresh subprocess (`python -m attnlab ...`, only the required arguments and a fresh --out),
idle or next to ``--busy N`` busy-loop processes (the "shared machine" case). Prints a table (command, seconds,
exit code, within target?) and writes JSON. The load average before each run is recorded: on a shared machine the
"idle" column is only as idle as the machine was.

  python benchmarks/defaults_time.py [--only capture,views] [--busy 0,2] [--timeout 600] [--quick] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGET_S = 180.0  # every command's defaults
TARGET_DEMO_S = 300.0  # `attnlab demo`

# name -> argv after `attnlab` ({out}: a fresh run directory). sparsity prefill is a GPU command on a trained model
# (`lm train --preset gpu`); it is not timed here.
COMMANDS: dict[str, list[str]] = {
    "capture": ["capture", "--out", "{out}"],
    "spectrum": ["spectrum", "--out", "{out}"],
    "views": ["views", "--out", "{out}", "--text", "The cat sat on the mat because it was warm."],
    "reconstruct fit": ["reconstruct", "fit", "--out", "{out}"],
    "reconstruct run": ["reconstruct", "run", "--out", "{out}"],
    "reconstruct train": ["reconstruct", "train", "--out", "{out}"],
    "sparsity train": ["sparsity", "train", "--out", "{out}"],
    "sparsity run": ["sparsity", "run", "--out", "{out}"],
    "variables train": ["variables", "train"],
    "variables sweep": ["variables", "sweep", "--out", "{out}"],
    "lm train": ["lm", "train", "--out", "{out}"],
    "demo": ["demo", "--out", "{out}"],
}
QUICK = {"help": ["--help"], "variables train (tiny)": ["variables", "train", "--T", "8", "--m", "32", "--max-steps",
                                                        "20", "--n-test", "64"]}


def _busy(n: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def time_command(argv: list[str], timeout: float, busy: int) -> dict:
    """Run ``attnlab argv`` once in a subprocess next to ``busy`` busy loops; its wall time and exit code."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    with tempfile.TemporaryDirectory() as tmp:
        args = [a.replace("{out}", str(Path(tmp) / "run")) for a in argv]
        load = os.getloadavg()[0]
        loops = _busy(busy)
        t0 = time.perf_counter()
        try:
            res = subprocess.run([sys.executable, "-m", "attnlab", *args], cwd=tmp, env=env, capture_output=True,
                                 text=True, timeout=timeout)
            rc, tail = res.returncode, (res.stderr or res.stdout)[-300:]
        except subprocess.TimeoutExpired:
            rc, tail = None, f"stopped after {timeout:.0f} s"
        seconds = time.perf_counter() - t0
        for p in loops:
            p.kill()
            p.wait()
    return {"seconds": round(seconds, 1), "rc": rc, "timed_out": rc is None, "load_before": round(load, 2),
            "tail": tail if rc else ""}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="", help="comma-separated command names (default: all)")
    ap.add_argument("--busy", default="0", help="comma-separated busy-loop counts, e.g. 0,2")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds before a command is stopped")
    ap.add_argument("--quick", action="store_true", help="time `--help` and a tiny variables train only (tests)")
    ap.add_argument("--out", default="results/defaults_time.json")
    a = ap.parse_args()
    table = QUICK if a.quick else COMMANDS
    names = [n.strip() for n in a.only.split(",") if n.strip()] or list(table)
    unknown = set(names) - set(table)
    if unknown:
        ap.error(f"--only: unknown {sorted(unknown)}; choose from {', '.join(table)}")
    busies = [int(b) for b in a.busy.split(",")]
    rows = []
    print(f"{'command':20s} {'busy':>4s} {'seconds':>8s} {'rc':>4s} {'load':>5s}  target")
    for name in names:
        for b in busies:
            r = {"command": name, "argv": table[name], "busy": b, **time_command(table[name], a.timeout, b)}
            target = TARGET_DEMO_S if name == "demo" else TARGET_S
            r["within_target"] = bool(r["rc"] == 0 and r["seconds"] <= target)
            rows.append(r)
            flag = "ok" if r["within_target"] else ("TIMEOUT" if r["timed_out"] else
                                                    "FAILED" if r["rc"] else f"> {target:.0f} s")
            print(f"{name:20s} {b:4d} {r['seconds']:8.1f} {str(r['rc']):>4s} {r['load_before']:5.2f}  {flag}", flush=True)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"cpu_count": os.cpu_count(), "target_s": TARGET_S, "target_demo_s": TARGET_DEMO_S,
                               "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
