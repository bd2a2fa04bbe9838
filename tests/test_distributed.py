"""torchrun with the gloo backend and 2 CPU processes gives the single-process statistics."""

from __future__ import annotations

import os
import subprocess
import sys

import torch

from attnlab.io import read_tensors


def test_torchrun_two_processes_equal_single(tmp_path):
    common = ["spectrum", "--n-sequences", "8", "--seq-len", "32", "--batch-size", "2", "--layers", "0,4",
              "--heads", "0-2", "--sketch-size", "0", "--no-report"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    single = subprocess.run([sys.executable, "-m", "attnlab", *common, "--out", str(tmp_path / "single")],
                            env=env, capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr
    dist = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                           "--master-port", "29533", "-m", "attnlab", *common, "--out", str(tmp_path / "dist")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert dist.returncode == 0, dist.stderr[-3000:]
    a, _ = read_tensors(tmp_path / "single" / "spectrum.safetensors")
    b, _ = read_tensors(tmp_path / "dist" / "spectrum.safetensors")
    keys = [k for k in a if k.startswith(("rows.cov", "rows.mean", "rows.eigvals"))]
    assert len(keys) == 3 * 2 * 3
    for k in keys:
        torch.testing.assert_close(a[k], b[k], rtol=1e-9, atol=1e-9)
