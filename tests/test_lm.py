"""attnlab lm: tiny byte-level Llama trains on CPU in seconds, saves a loadable HF folder, caches."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from attnlab.errors import ConfigError, CorpusError
from attnlab.lm.data import is_heldout, load_corpus
from attnlab.lm.train import META, PRESETS, config_from, load_or_train


def _tiny():
    return dataclasses.replace(PRESETS["tiny"], seq_len=64, long_seq_len=128, steps=8, batch_size=2, eval_windows=1,
                               max_bytes=300_000)


def test_corpus_split_by_document(tmp_path):
    for i in range(40):
        (tmp_path / f"m{i}.py").write_text(f"def f{i}():\n    return {i}\n" * 20)
    c = load_corpus(tmp_path, heldout_frac=0.2)
    assert c.n_train_docs + c.n_heldout_docs == 40 and c.n_heldout_docs > 0
    held = {f"m{i}.py" for i in range(40) if is_heldout(f"m{i}.py", 0.2)}
    assert len(held) == c.n_heldout_docs
    # documents are separated by EOS (1) and every other id is a byte + 3
    assert int((c.train == 1).sum()) == c.n_train_docs and int(c.train[c.train != 1].min()) >= 3
    with pytest.raises(CorpusError):
        load_corpus(tmp_path / "missing")


def test_lm_train_tiny_saves_loads_and_caches(tmp_path):
    cfg = _tiny()
    out = tmp_path / "lm"
    res = load_or_train(cfg, out)
    assert not res.cached and res.steps == cfg.steps
    # learned something: far below the uniform byte loss log(259)
    assert res.heldout_loss < math.log(259) - 0.5 and res.train_loss < math.log(259) - 0.5
    meta = json.loads((out / META).read_text())
    assert meta["train_loss"] == res.train_loss and meta["corpus"]["heldout_docs"] > 0
    assert "heldout_loss" in meta["history"][0]  # the held-out curve starts at step 1
    from attnlab.capture.hf import load_model

    hf = load_model(str(out), head="causal-lm")
    assert hf.causal and hf.n_layers == cfg.n_layers and hf.n_heads == cfg.n_heads
    assert hf.model.config.num_key_value_heads == cfg.n_kv_heads  # GQA
    ids = hf.tokenizer("def f():\n")["input_ids"]
    assert ids[:3] == [ord("d") + 3, ord("e") + 3, ord("f") + 3]
    again = load_or_train(cfg, out)
    assert again.cached and again.heldout_loss == res.heldout_loss
    changed = load_or_train(dataclasses.replace(cfg, steps=2), out)
    assert not changed.cached and changed.steps == 2


def test_lm_config_errors():
    with pytest.raises(ConfigError, match="--preset"):
        config_from("huge")
    with pytest.raises(ConfigError, match="n-kv-heads"):
        config_from("tiny", n_heads=4, n_kv_heads=3)
    with pytest.raises(ConfigError, match="max-positions"):
        config_from("tiny", seq_len=10**6)


def test_lm_cli_tiny(tmp_path):
    from typer.testing import CliRunner

    from attnlab.cli import app

    r = CliRunner().invoke(app, ["lm", "train", "--preset", "tiny", "--seq-len", "64", "--steps", "2",
                                 "--batch-size", "1", "--max-bytes", "200000", "--out", str(tmp_path / "m"), "--quiet"])
    assert r.exit_code == 0, r.output
    assert "held-out loss" in r.output and (tmp_path / "m" / "config.json").exists()
    r = CliRunner().invoke(app, ["lm", "train", "--preset", "tiny", "--n-heads", "3", "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "error" in r.output


def test_lm_model_files_honour_umask(tmp_path):
    """Every file of the saved model folder (model.safetensors included: save_pretrained made it 0600) gets
    0666 minus the umask, like an ordinary open(); a file the writer did not touch keeps its own mode."""
    import os
    import stat

    out = tmp_path / "lm"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    os.chmod(out / "notes.txt", 0o600)
    old = os.umask(0o027)
    try:
        load_or_train(dataclasses.replace(_tiny(), steps=1, long_frac=0.0, max_bytes=60_000, eval_every=0), out)
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir() if p.is_file() and p.name != "notes.txt"}
    assert "model.safetensors" in modes and META in modes
    assert set(modes.values()) == {0o640}, modes
    assert stat.S_IMODE((out / "notes.txt").stat().st_mode) == 0o600


def test_lm_train_resume_matches_uninterrupted(tmp_path, monkeypatch):
    """Interrupted right after its first checkpoint (step 3 of 6), `lm train --resume` continues from it and saves
    the same weights and losses as an uninterrupted run; a checkpoint from other settings is refused."""
    import attnlab.lm.train as lm_train
    from attnlab.errors import ResultsError

    cfg = dataclasses.replace(_tiny(), steps=6, eval_every=3, long_frac=0.0, max_bytes=60_000)
    ref = load_or_train(cfg, tmp_path / "ref")
    assert not (tmp_path / "ref" / lm_train.PARTIAL).exists()  # removed once the model is saved

    def stop():
        raise KeyboardInterrupt

    monkeypatch.setattr(lm_train, "checkpoint_written", stop)
    with pytest.raises(KeyboardInterrupt):
        load_or_train(cfg, tmp_path / "cut")
    assert (tmp_path / "cut" / lm_train.PARTIAL).exists() and not (tmp_path / "cut" / META).exists()
    monkeypatch.undo()
    with pytest.raises(ResultsError, match="other settings"):
        load_or_train(dataclasses.replace(cfg, lr=1e-3), tmp_path / "cut", resume=True)
    logs: list = []
    res = load_or_train(cfg, tmp_path / "cut", resume=True, log=logs.append)
    assert any("resuming from" in x and "step 3/6" in x for x in logs)
    assert (res.train_loss, res.heldout_loss, res.steps) == (ref.train_loss, ref.heldout_loss, ref.steps)
    assert (tmp_path / "cut" / "model.safetensors").read_bytes() == (tmp_path / "ref" / "model.safetensors").read_bytes()
    assert [h["loss"] for h in res.meta["history"]] == [h["loss"] for h in ref.meta["history"]]
    assert not (tmp_path / "cut" / lm_train.PARTIAL).exists()
