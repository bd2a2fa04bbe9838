"""Heavy workloads under torchrun (gloo, 2 CPU processes) give the single-process numbers; sharding helpers."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from attnlab.distributed import DistInfo, gather_ordered, shard, shard_indices, unshard
from conftest import save_tiny_bert

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
       "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(args: list[str], nproc: int = 2, timeout: int = 300) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --nproc-per-node nproc ARGS`` on a free port; asserts success."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           "--master-port", str(_free_port()), *args]
    res = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    return res


def test_shard_unshard_round_robin():
    items = list("abcdefg")
    parts = [shard(items, DistInfo(r, 3)) for r in range(3)]
    assert parts == [["a", "d", "g"], ["b", "e"], ["c", "f"]]
    assert shard_indices(7, DistInfo(1, 3)) == [1, 4]
    assert unshard(parts, 7) == items
    assert gather_ordered(items, 7, DistInfo()) == items  # single process: the identity
    with pytest.raises(ValueError):
        unshard(parts, 8)


HELPERS_SCRIPT = '''
import json, sys, torch
from attnlab.distributed import (all_reduce_sum_, broadcast_object, gather_lists, gather_ordered, init_distributed,
                                 shard)
info = init_distributed("cpu")
items = list(range(11))
mine = [x * x for x in shard(items, info)]
ordered = gather_ordered(mine, len(items), info)
everywhere = gather_ordered(mine, len(items), info, to_all=True)
cat = gather_lists([info.rank], info)
b = broadcast_object({"from": info.rank}, info)
t = torch.tensor([0.1 * (info.rank + 1)], dtype=torch.float32)
all_reduce_sum_([t], info)
assert everywhere == [x * x for x in items], everywhere
assert b == {"from": 0}
assert (ordered is None) == (not info.is_main) and (cat is None) == (not info.is_main)
if info.is_main:
    json.dump({"ordered": ordered, "cat": cat, "sum": float(t), "world": info.world_size}, open(sys.argv[1], "w"))
'''


def test_helpers_under_torchrun_gloo(tmp_path):
    script = tmp_path / "helpers.py"
    script.write_text(HELPERS_SCRIPT)
    torchrun([str(script), str(tmp_path / "out.json")])
    out = json.loads((tmp_path / "out.json").read_text())
    assert out == {"ordered": [x * x for x in range(11)], "cat": [0, 1], "sum": pytest.approx(0.3), "world": 2}


# ------------------------------------------------------------------------------------------------------------
# sparsity prefill
# ------------------------------------------------------------------------------------------------------------


def test_prefill_two_processes_equal_single(tiny_lm, tmp_path):
    """3 windows over 2 ranks (uneven shards): per-window losses and per-head statistics equal one process's."""
    from attnlab.blocksparse.prefill import PrefillConfig, run_prefill

    cfg = PrefillConfig(model=tiny_lm, seq_len=64, predictor="oracle", recall=0.8, block_size=16, windows=3, rows=16,
                        reps=1, device="cpu")
    single = run_prefill(cfg)
    out = tmp_path / "dist.json"
    torchrun(["-m", "attnlab", "sparsity", "prefill", "--model", tiny_lm, "--seq-len", "64", "--predictor", "oracle",
              "--recall", "0.8", "--block-size", "16", "--windows", "3", "--rows", "16", "--reps", "1",
              "--device", "cpu", "--out", str(out)])
    dist = json.loads(out.read_text())
    assert dist["world_size"] == 2 and single["world_size"] == 1
    assert [w["window"] for w in dist["windows"]] == [0, 1, 2]
    for a, b in zip(single["windows"], dist["windows"]):
        assert a["loss_dense"] == pytest.approx(b["loss_dense"], rel=1e-5, abs=1e-6)
        assert a["loss_sparse"] == pytest.approx(b["loss_sparse"], rel=1e-5, abs=1e-6)
    for key in ("density", "recall", "out_error"):
        torch.testing.assert_close(torch.tensor(dist["per_head"][key], dtype=torch.float64),
                                   torch.tensor(single["per_head"][key], dtype=torch.float64), rtol=1e-5, atol=1e-6)
    assert dist["per_head"]["dense_fallback"] == single["per_head"]["dense_fallback"]
    for m, d in single["timings"].items():  # every timed sample came back
        assert dist["timings"][m]["attention_ms"]["n"] == d["attention_ms"]["n"]
    s, d = single["summary"], dist["summary"]
    assert d["recall_min_head"] == pytest.approx(s["recall_min_head"], rel=1e-5)
    assert d["density_predicted_mean"] == pytest.approx(s["density_predicted_mean"], rel=1e-6)


def test_more_processes_than_work_items_is_a_config_error():
    from attnlab.distributed import require_work_per_rank
    from attnlab.errors import ConfigError

    with pytest.raises(ConfigError, match="--windows 1"):
        require_work_per_rank(1, DistInfo(0, 2), "--windows")


# ------------------------------------------------------------------------------------------------------------
# variables sweep
# ------------------------------------------------------------------------------------------------------------

SWEEP = ["--task", "and", "--seeds", "2", "--m-min", "4", "--m-max", "64", "--rtol", "0.3",
         "--max-steps", "40", "--n-test", "64", "--contrast", "none", "--no-probe", "--device", "cpu"]


def _sweep_trials(run: Path) -> dict:
    from attnlab.io import read_json

    return read_json(run / "variables_trials.json")["trials"]


def test_variables_sweep_two_processes_equal_single_and_resume(tmp_path):
    """Trials of each round sharded over 2 ranks: the same trials and accuracies as one process; a torchrun
    --resume with one more T reuses the saved trials (rank 0 merged them) and trains only the new T's.
    (No --s flag: torchrun's own parser would take '--s' for an abbreviation of its options.)"""
    from typer.testing import CliRunner

    from attnlab.cli import app

    single = CliRunner().invoke(app, ["variables", "sweep", *SWEEP, "--T", "4", "--T", "8", "--out",
                                      str(tmp_path / "single")])
    assert single.exit_code == 0, single.output
    dist = tmp_path / "dist"
    torchrun(["-m", "attnlab", "variables", "sweep", *SWEEP, "--T", "4", "--out", str(dist)])
    first = _sweep_trials(dist)
    assert first and all(r["T"] == 4 for r in first.values())
    from attnlab.io import RunDir

    assert RunDir(dist).results()["variables"]["sharding"] == ["search_each_T"]  # 1 T < 2 ranks: rounds sharded
    torchrun(["-m", "attnlab", "variables", "sweep", *SWEEP, "--T", "4", "--T", "8", "--resume", "--out", str(dist)])
    a, b = _sweep_trials(tmp_path / "single"), _sweep_trials(dist)
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k]["accuracy"] == pytest.approx(b[k]["accuracy"], abs=1e-9), k
        assert a[k]["train_loss"] == pytest.approx(b[k]["train_loss"], rel=1e-4, abs=1e-6), k
    for k, r in first.items():  # resumed trials were reused, not retrained
        assert b[k] == r
    sa, sb = RunDir(tmp_path / "single").results()["variables"], RunDir(dist).results()["variables"]
    assert [r["m_star"] for r in sa["results"]] == [r["m_star"] for r in sb["results"]]
    assert sb["world_size"] == 2
    assert sb["sharding"] == ["search_sharded_T"]  # 2 T's on 2 ranks: each rank searched its own T
    assert sorted(r["rank"] for r in sb["results"]) == [0, 1]
    assert not list(dist.glob("variables_trials.rank*.json"))  # merged by rank 0 and removed


def test_trial_store_resume_reads_rank_files(tmp_path):
    """An interrupted T-sharded run leaves per-rank trial files; a resume reads them with the merged file."""
    from attnlab.variables.complexity import TrialStore

    path = tmp_path / "variables_trials.json"
    TrialStore(path, {"a": 1}).put(4, 8, 0, {"accuracy": 1.0})
    r1 = TrialStore(path, {"a": 1}, save_to=TrialStore.rank_file(path, 1))
    r1.put(8, 16, 0, {"accuracy": 0.5})
    assert TrialStore.rank_file(path, 1) != path and TrialStore.rank_file(path, 1).exists()
    back = TrialStore(path, {"a": 1}, resume=True)
    assert back.get(4, 8, 0)["accuracy"] == 1.0 and back.get(8, 16, 0)["accuracy"] == 0.5
    assert TrialStore(path, {"a": 1}, resume=False).trials == {}
    with pytest.raises(Exception, match="settings differ"):
        TrialStore(path, {"a": 2}, resume=True)


# ------------------------------------------------------------------------------------------------------------
# reconstruct run
# ------------------------------------------------------------------------------------------------------------

RECONSTRUCT_SCRIPT = '''
import json, sys
from attnlab.reconstruct.run import reconstruct
reconstruct(sys.argv[1], model=sys.argv[2], progress=False, **json.loads(sys.argv[3]))
'''


def test_reconstruct_run_two_processes_equal_single(tmp_path):
    """Fit sums (with the proxy+gaussian residual pass) all-reduced, held-out evaluation and frontier chunks
    sharded: the table, frontier and fit equal one process's; 5 fit and 5 held-out windows (uneven shards)."""
    from attnlab.io import RunDir, read_tensors
    from attnlab.reconstruct.run import reconstruct

    model = save_tiny_bert(tmp_path / "tinybert")
    kw = dict(seq_len=32, n_fit=5, n_eval=5, budgets=[0.25], estimators=["gaussian", "proxy+gaussian", "none"],
              selections=["random", "adaptive"], position=True, pooled_baseline=False, dropin=True, extra_ranks=[],
              frontier=True, families=["proxy-only", "gaussian-qr"], frontier_ranks=[2], frontier_budgets=[1 / 4],
              chunks=2, batch_size=2)
    single = reconstruct(tmp_path / "single", model=model, progress=False, **kw)
    script = tmp_path / "reconstruct_script.py"
    script.write_text(RECONSTRUCT_SCRIPT)
    torchrun([str(script), str(tmp_path / "dist"), model, json.dumps(kw)])
    dist = RunDir(tmp_path / "dist").results()["reconstruct"]
    assert dist["world_size"] == 2 and single["world_size"] == 1
    assert sorted(dist["table"]) == sorted(single["table"]) and dist["best"] == single["best"]
    for lab, v in single["table"].items():
        for l, m in v["per_layer"].items():
            for k, x in m.items():
                y = float(dist["table"][lab]["per_layer"][l][k])  # JSON keeps inf as the string 'inf'
                assert y == pytest.approx(float(x), rel=1e-6, abs=1e-9), (lab, l, k)
    for lab, v in single["frontier_points"].items():
        assert dist["frontier_points"][lab]["worst_layer_tv_pooled"] == pytest.approx(v["worst_layer_tv_pooled"],
                                                                                        rel=1e-6, abs=1e-9)
    assert dist["dropin"][0]["hidden_cosine"] == pytest.approx(single["dropin"][0]["hidden_cosine"], rel=1e-6)
    a, _ = read_tensors(tmp_path / "single" / "reconstruct_fit.safetensors")
    b, _ = read_tensors(tmp_path / "dist" / "reconstruct_fit.safetensors")
    assert sorted(a) == sorted(b) and any(k.startswith("resid.") for k in a)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-9, atol=1e-9)


# ------------------------------------------------------------------------------------------------------------
# sparsity run
# ------------------------------------------------------------------------------------------------------------

# A tiny small-model setting whose gold graphs are sparse (sparsemax, 150 steps: gold sparsity ~0.5), so that the
# learned predictors really train; 11 fit / 7 eval / 5 downstream windows shard unevenly over 2 ranks.
SPARSITY = ["sparsity", "run", "--model", "small", "--objective", "clm", "--seq-len", "24", "--vocab-size", "256",
            "--d-model", "32", "--n-heads", "2", "--n-layers", "2", "--alpha", "2", "--steps", "150", "--lr", "0.005",
            "--batch-size", "8", "--max-windows", "64", "--n-fit", "11", "--n-eval", "7", "--n-down", "5",
            "--epochs", "3", "--quiet"]


def test_sparsity_run_two_processes_equal_single(tmp_path):
    """Gold-graph capture, evaluation and downstream windows sharded, learned predictors fitted data-parallel:
    every method's points, the downstream scores and the fitted predictors equal one process's."""
    from attnlab.io import RunDir, read_tensors

    single = subprocess.run([sys.executable, "-m", "attnlab", *SPARSITY, "--out", str(tmp_path / "single")], env=ENV,
                            capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stdout[-2000:] + single.stderr[-4000:]
    torchrun(["-m", "attnlab", *SPARSITY, "--out", str(tmp_path / "dist")])
    a = RunDir(tmp_path / "single", create=False).results()["sparsity"]
    b = RunDir(tmp_path / "dist", create=False).results()["sparsity"]
    assert a["world_size"] == 1 and b["world_size"] == 2 and b["complete"]
    # each rank really held its own share of the windows
    assert [r["windows"] for r in b["ranks"]] == [{"fit": 6, "eval": 4, "down": 3}, {"fit": 5, "eval": 3, "down": 2}]
    assert [r["windows"] for r in a["ranks"]] == [{"fit": 11, "eval": 7, "down": 5}]
    assert a["gold"]["sparsity"] > 0.3  # sparse gold graphs: the predictors have something to learn
    assert b["gold"]["density_per_layer"] == pytest.approx(a["gold"]["density_per_layer"], abs=1e-12)
    assert sorted(a["methods"]) == sorted(b["methods"]) and "rank" in a["methods"] and "clustering" in a["methods"]
    for m, res in a["methods"].items():
        pts = b["methods"][m]["points"]
        assert [p["knob"] for p in pts] == [p["knob"] for p in res["points"]], m
        for p, q in zip(res["points"], pts):
            for k in ("sparsity", "recall", "exact", "cost"):
                assert q["mean"][k] == pytest.approx(p["mean"][k], abs=1e-5), (m, p["knob"], k)
            assert q["windows"]["recall"]["std"] == pytest.approx(p["windows"]["recall"]["std"], abs=1e-5)
        assert b["recall_at_0.9"][m] == pytest.approx(a["recall_at_0.9"][m], abs=1e-5), m
    for loss_a, loss_b in zip(a["projector_loss"], b["projector_loss"]):  # the projectors trained (loss > 0) alike
        assert loss_a[0] > 0 and loss_b == pytest.approx(loss_a, rel=1e-5)
    da, db = a["downstream"], b["downstream"]
    assert db["full_entmax"]["loss"] == pytest.approx(da["full_entmax"]["loss"], abs=1e-5)
    for m, rows in da["methods"].items():
        for r, s in zip(rows, db["methods"][m]):
            assert (s["knob"], s["loss"]) == (r["knob"], pytest.approx(r["loss"], abs=1e-5)), m
    ta, _ = read_tensors(tmp_path / "single" / "predictors.safetensors")
    tb, _ = read_tensors(tmp_path / "dist" / "predictors.safetensors")
    assert sorted(ta) == sorted(tb) and any(k.startswith("rank.") for k in ta)
    for k in ta:
        torch.testing.assert_close(tb[k], ta[k], rtol=1e-5, atol=1e-6, msg=k)


def test_global_batches_cover_every_window_and_balance_ranks():
    """Data-parallel fitting: each epoch's batches hold every window once, do not depend on the number of ranks,
    and give 1, 2 or 4 round-robin ranks equal shares of every full batch (no rank waits at the all-reduce)."""
    from attnlab.sparsity.predictors.dataparallel import global_batches

    for n, bs in [(32, 16), (40, 8), (37, 12)]:
        batches = global_batches(n, bs, torch.Generator().manual_seed(3))
        assert sorted(i for b in batches for i in b) == list(range(n))
        assert batches == global_batches(n, bs, torch.Generator().manual_seed(3))
        assert batches != global_batches(n, bs, torch.Generator().manual_seed(4))
        if n % 4 == 0 and bs % 4 == 0:
            for world in (2, 4):
                for b in batches:
                    shares = [sum(1 for i in b if i % world == r) for r in range(world)]
                    assert len(set(shares)) == 1, (n, bs, world, shares)
