"""Interrupted Sparsefinder training resumes to bit-identical numbers (issue 8: interrupted runs)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from attnlab.errors import ResultsError
from attnlab.io import read_tensors
from attnlab.sparsity.train_entmax import (
    EntmaxTrainConfig,
    load_corpus_windows,
    partial_path,
    tokenizer_of,
    train_and_save,
    train_small,
)

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
TINY = dict(seq_len=16, vocab_size=128, d_model=32, n_heads=2, n_layers=2, steps=40, batch_size=8, max_windows=64,
            seed=3, checkpoint_every=10)
CLI = ["sparsity", "train", "--seq-len", "16", "--vocab-size", "128", "--d-model", "32", "--n-heads", "2",
       "--n-layers", "2", "--steps", "300", "--batch-size", "8", "--max-windows", "64", "--checkpoint-every", "10",
       "--seed", "1"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: one intra-op thread is fastest and avoids thread spinning on a shared 2-core box."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tokenizer():
    return tokenizer_of()


@pytest.fixture(scope="module")
def windows(tokenizer):
    return load_corpus_windows(EntmaxTrainConfig(**TINY), tokenizer, "fit", 64)


class Interrupt:
    """``on_step`` hook raising KeyboardInterrupt (as Ctrl-C would) once ``at`` steps are done."""

    def __init__(self, at: int):
        self.at = at

    def __call__(self, done: int) -> None:
        if done == self.at:
            raise KeyboardInterrupt


def _same_model(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_interrupted_training_resumes_bit_identical(tmp_path, tokenizer, windows):
    cfg = EntmaxTrainConfig(**TINY)  # mlm: data order *and* masking draw from the checkpointed generator
    ref, _, ref_hist = train_small(cfg, windows, tokenizer, log_every=1, quiet=True)
    out = tmp_path / "model.safetensors"
    part = partial_path(out)
    with pytest.raises(KeyboardInterrupt):
        train_and_save(cfg, out, tokenizer, windows, log_every=1, quiet=True, on_step=Interrupt(25))
    assert part.is_file() and not out.exists()
    _, meta = read_tensors(part)  # whole and readable; last checkpoint before the interrupt
    assert meta["step"] == 20 and meta["history"]["step"] == list(range(20))
    steps: list[int] = []
    model, _, hist = train_and_save(cfg, out, tokenizer, windows, resume=True, log_every=1, quiet=True,
                                    on_step=steps.append)
    assert steps == list(range(21, 41))  # finished steps were not redone
    assert not part.exists() and out.is_file()  # partial checkpoint removed once the final model is written
    _same_model(ref.state_dict(), model.state_dict())
    assert hist["loss"] == ref_hist["loss"] and hist["step"] == ref_hist["step"]
    assert [str(a) for a in hist["acc"]] == [str(a) for a in ref_hist["acc"]]


def test_resume_with_other_settings_is_refused(tmp_path, tokenizer, windows):
    cfg = EntmaxTrainConfig(**TINY)
    part = tmp_path / "p.safetensors"
    with pytest.raises(KeyboardInterrupt):
        train_small(cfg, windows, tokenizer, quiet=True, checkpoint=part, on_step=Interrupt(12))
    other = EntmaxTrainConfig(**{**TINY, "lr": 5e-4})
    with pytest.raises(ResultsError, match="other settings") as err:
        train_small(other, windows, tokenizer, quiet=True, checkpoint=part, resume=True)
    assert str(part) in str(err.value) and "--resume" in str(err.value)
    with pytest.raises(ResultsError, match="other settings"):  # different data is refused too
        train_small(cfg, windows[:32], tokenizer, quiet=True, checkpoint=part, resume=True)
    # checkpoint cadence does not change results: resuming with another --checkpoint-every is fine
    train_small(EntmaxTrainConfig(**{**TINY, "checkpoint_every": 7}), windows, tokenizer, quiet=True,
                checkpoint=part, resume=True)
    # without resume the stale checkpoint is ignored and training starts over
    train_small(other, windows, tokenizer, quiet=True, checkpoint=part, resume=False)


def _cli(out, *extra):
    return [sys.executable, "-m", "attnlab", *CLI, "--out", str(out), *extra]


@pytest.mark.parametrize("sig", [signal.SIGKILL], ids=["SIGKILL"])
def test_killed_cli_training_resumes_to_same_model(tmp_path, sig):
    ref_out, out = tmp_path / "ref.safetensors", tmp_path / "run" / "model.safetensors"
    ref = subprocess.Popen(_cli(ref_out, "--quiet"), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc = subprocess.Popen(_cli(out), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    part = partial_path(out)
    deadline = time.time() + 120
    while not part.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    time.sleep(0.2)  # a few more steps (and possibly a checkpoint) past the first one
    proc.send_signal(sig)
    proc.communicate(timeout=60)
    assert proc.returncode != 0, "training finished before it could be killed"
    assert part.exists() and not out.exists()
    _, meta = read_tensors(part)  # atomic writes: the checkpoint on disk is whole
    killed_at = meta["step"]
    assert 10 <= killed_at < 300
    res = subprocess.run(_cli(out, "--resume"), env=ENV, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert f"resuming training from {part} at step {killed_at}/300" in res.stdout
    assert "step     0 " not in res.stdout  # finished steps are not redone
    assert not part.exists()
    _, stderr = ref.communicate(timeout=300)
    assert ref.returncode == 0, stderr
    a, ma = read_tensors(ref_out)
    b, mb = read_tensors(out)
    _same_model(a, b)
    assert ma["history"]["loss"] == mb["history"]["loss"]
    # a finished model is kept; one from other settings is refused, naming the file and the fix
    from typer.testing import CliRunner

    from attnlab.sparsity.cli import app

    again = CliRunner().invoke(app, [*CLI[1:], "--out", str(out), "--resume"])
    assert again.exit_code == 0 and "nothing to do" in again.output
    other = CliRunner().invoke(app, [*CLI[1:], "--out", str(out), "--resume", "--lr", "0.0005"])
    assert other.exit_code == 2 and "other settings" in other.output and "--resume" in other.output
    assert read_tensors(out)[0].keys() == b.keys()  # untouched
