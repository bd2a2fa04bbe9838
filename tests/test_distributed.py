"""torchrun with the gloo backend and 2 CPU processes gives the single-process statistics."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import torch

from attnlab.io import read_json, read_tensors


COMMON = ["spectrum", "--n-sequences", "8", "--seq-len", "32", "--batch-size", "2", "--layers", "0,4",
          "--heads", "0-2", "--sketch-size", "0", "--no-report"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _single(out) -> None:
    single = subprocess.run([sys.executable, "-m", "attnlab", *COMMON, "--out", str(out)],
                            env=ENV, capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr


def _assert_same_statistics(single, dist) -> None:
    a, _ = read_tensors(single / "spectrum.safetensors")
    b, _ = read_tensors(dist / "spectrum.safetensors")
    keys = [k for k in a if k.startswith(("rows.cov", "rows.mean", "rows.eigvals"))]
    assert len(keys) == 3 * 2 * 3
    for k in keys:
        torch.testing.assert_close(a[k], b[k], rtol=1e-9, atol=1e-9)
    ra = read_json(single / "results.json")["spectrum"]["rank_interval"]  # per-group statistics all-reduced too
    rb = read_json(dist / "results.json")["spectrum"]["rank_interval"]
    assert ra["groups"] == rb["groups"] == 8 and ra["rows_per_group"] == rb["rows_per_group"]
    pairs = [(ra["pooled"], rb["pooled"])] + [(ra["per_layer"][l], rb["per_layer"][l]) for l in ra["per_layer"]]
    for x, y in pairs:
        assert all(x[k] == y[k] for k in ("k90", "k95", "k99"))
        assert all(abs(x["se"][k] - y["se"][k]) < 1e-3 for k in x["se"])


def test_torchrun_two_processes_equal_single(tmp_path):
    _single(tmp_path / "single")
    dist = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                           "--master-port", str(_free_port()), "-m", "attnlab", *COMMON, "--out", str(tmp_path / "dist")],
                          env=ENV, capture_output=True, text=True, timeout=300)
    assert dist.returncode == 0, dist.stderr[-3000:]
    _assert_same_statistics(tmp_path / "single", tmp_path / "dist")


def test_torchrun_two_nodes_c10d_rendezvous_equal_single(tmp_path):
    """Two torchrun launchers (one per 'node') meet through a c10d rendezvous on localhost, as on a cluster."""
    _single(tmp_path / "single")
    endpoint = f"127.0.0.1:{_free_port()}"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", f"attnlab-{os.getpid()}",
           "-m", "attnlab", *COMMON, "--out", str(tmp_path / "dist")]
    nodes = [subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [n.communicate(timeout=300) for n in nodes]
    for n, (_, err) in zip(nodes, outs):
        assert n.returncode == 0, err[-3000:]
    _assert_same_statistics(tmp_path / "single", tmp_path / "dist")


def test_torchrun_fewer_windows_than_ranks_is_one_clear_error(tmp_path):
    """One window, two ranks: rank 1 would have nothing and stall the all-reduce; both ranks refuse up front."""
    cmd = ["spectrum", "--n-sequences", "1", "--seq-len", "16", "--layers", "0", "--heads", "0", "--sketch-size", "0",
           "--no-report"]
    dist = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                           "--master-port", str(_free_port()), "-m", "attnlab", *cmd, "--out", str(tmp_path / "d")],
                          env=ENV, capture_output=True, text=True, timeout=300)
    assert dist.returncode != 0
    assert "--n-sequences 1: fewer than the 2 torchrun processes" in dist.stdout + dist.stderr
    assert "/attnlab/" not in "".join(line for line in (dist.stdout + dist.stderr).splitlines() if "File " in line)
