"""Run-directory integrity and corpus handling (issue 18 items 1-3, 5, 8; issue 17 small corpora and warnings)."""

from __future__ import annotations

import errno
import json
import logging
import os
import stat
import subprocess
import sys
import threading
import time

import pytest
import torch

from attnlab.capture.corpus import check_windows, iter_documents, token_windows
from attnlab.errors import CorpusError, NumericalError, ResultsError
from attnlab.io import lock_output, write_json, write_tensors

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
HOLD_LOCK = ("import sys; from attnlab.io import lock_output\n"
             "with lock_output(sys.argv[1]):\n    print('locked', flush=True); sys.stdin.read()\n")


def _hold_lock(path):
    proc = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(path)], env=ENV, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"  # blocks until the child holds the lock (no sleep)
    return proc


def test_busy_run_directory_is_refused_and_released_on_crash(tmp_path, capsys):
    from attnlab.cli import invoke

    out = tmp_path / "run"
    holder = _hold_lock(out)
    try:
        code = invoke(["spectrum", "--out", str(out), "--n-sequences", "1"])
        err = capsys.readouterr().err
        assert code == 2 and "in use by another attnlab run" in err and str(holder.pid) in err
        with pytest.raises(ResultsError, match="in use"):
            with lock_output(out):
                pass
    finally:
        holder.kill()  # SIGKILL: the kernel drops the flock with the process
        holder.wait(timeout=60)
    with lock_output(out):  # free again
        with lock_output(out):  # re-entrant in one process
            pass


def test_output_files_respect_umask(tmp_path):
    from attnlab.report.plotting import save_figure
    from attnlab.variables.plots import plot_probe

    import matplotlib.pyplot as plt

    old = os.umask(0o022)
    try:
        write_json(tmp_path / "a.json", {"x": 1})
        write_tensors(tmp_path / "t.safetensors", {"x": torch.zeros(2)})
        save_figure(plt.figure(), tmp_path / "f.png")
        probe = {"T": 8, "per_seed": {"0": {"mass": [0.5], "topk_precision": [0.5]}}}
        plot_probe(probe, tmp_path / "p.png")
        for name in ("a.json", "t.safetensors", "f.png", "p.png"):
            assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644, name
        os.umask(0o077)
        write_json(tmp_path / "b.json", {"x": 1})
        assert stat.S_IMODE((tmp_path / "b.json").stat().st_mode) == 0o600
    finally:
        os.umask(old)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left


def test_variables_plot_is_atomic(tmp_path, monkeypatch):
    """A savefig that dies half-way leaves the previous PNG intact (it wrote straight to the target before)."""
    from matplotlib.figure import Figure

    from attnlab.variables.plots import plot_probe

    probe = {"T": 8, "per_seed": {"0": {"mass": [0.5], "topk_precision": [0.5]}}}
    target = plot_probe(probe, tmp_path / "p.png")
    before = target.read_bytes()

    def broken(self, fname, *a, **k):
        with open(fname, "wb") as fh:
            fh.write(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", broken)
    with pytest.raises((OSError, ResultsError)):
        plot_probe(probe, target)
    assert target.read_bytes() == before


def test_full_disk_is_one_clear_error(tmp_path, monkeypatch):
    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    write_json(tmp_path / "r.json", {"a": 1})
    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(ResultsError, match="disk full"):
        write_json(tmp_path / "r.json", {"a": 2})
    monkeypatch.undo()
    assert json.loads((tmp_path / "r.json").read_text()) == {"a": 1}


def test_stale_cached_model_is_refused(tmp_path):
    """`sparsity run` with resume must not reuse a cached model trained with other settings (issue 18 item 1)."""
    from attnlab.io import RunDir
    from attnlab.sparsity.run import CHECKPOINT, prepare_small
    from attnlab.sparsity.train_entmax import EntmaxTrainConfig, train_and_save

    small = dict(seq_len=16, vocab_size=64, d_model=16, n_heads=2, n_layers=1, steps=1, batch_size=2, max_windows=16)
    run = RunDir(tmp_path)
    train_and_save(EntmaxTrainConfig(**small), run.file(CHECKPOINT), quiet=True)
    same = prepare_small(run, EntmaxTrainConfig(**small, checkpoint_every=7), None, resume=True, quiet=True)
    assert same[2].alpha == 1.5
    for other in (dict(alpha=2.0), dict(objective="clm"), dict(seq_len=32)):
        with pytest.raises(ResultsError, match="other settings"):
            prepare_small(run, EntmaxTrainConfig(**{**small, **other}), None, resume=True, quiet=True)


def test_broken_checkpoint_is_a_clear_error(tmp_path):
    from attnlab.sparsity.train_entmax import EntmaxTrainConfig, load_small, save_small, train_small

    cfg = EntmaxTrainConfig(seq_len=16, vocab_size=64, d_model=16, n_heads=2, n_layers=1, steps=1, batch_size=2,
                            max_windows=16)
    model, vmap, hist = train_small(cfg, quiet=True)
    p = save_small(tmp_path / "m.safetensors", model, vmap, cfg, hist)
    from attnlab.io import read_tensors

    tensors, meta = read_tensors(p)
    meta["model_config"]["d_model"] = 32  # weights no longer fit the config
    write_tensors(p, tensors, meta)
    with pytest.raises(ResultsError, match="broken entmax checkpoint"):
        load_small(p)


def test_variables_divergence_names_lr():
    from attnlab.variables.tasks import make_task
    from attnlab.variables.train import TrainConfig, train_model

    task = make_task("and", 6, 2, 0)
    with pytest.raises(NumericalError, match="--lr"):
        train_model(task, 32, TrainConfig(lr=1e30, d_model=8, max_steps=20, n_test=32, n_val=32, eval_every=5))


# ---------------------------------------------------------------------------------------------- spectrum resume
class _Stop(Exception):
    pass


def _spectrum_kw(corpus):
    return dict(corpus=str(corpus), n_sequences=4, seq_len=16, batch_size=1, layers=[0], heads=[0], sketch_size=0,
                checkpoint_every=1, progress=False)


def _interrupted_spectrum(run, minilm, corpus, monkeypatch):
    import attnlab.spectral.run as sr

    def stop():
        raise _Stop

    monkeypatch.setattr(sr, "checkpoint_written", stop)  # "killed" right after the first checkpoint
    with pytest.raises(_Stop):
        sr.spectrum(run, model=minilm, **_spectrum_kw(corpus))
    monkeypatch.undo()
    assert (run / "spectrum.ckpt.rank0.safetensors").exists()


def _corpus_text(word):
    return "\n\n".join(f"{word} paragraph number {i} has a few words of plain text in it." for i in range(40))


def test_resume_refuses_a_changed_corpus(tmp_path, minilm, monkeypatch):
    """Same --corpus path, other content: the checkpoint fingerprint covers the windows (issue 18 item 3)."""
    from attnlab.spectral.run import spectrum

    corpus = tmp_path / "c.txt"
    corpus.write_text(_corpus_text("alpha"))
    _interrupted_spectrum(tmp_path / "run", minilm, corpus, monkeypatch)
    corpus.write_text(_corpus_text("omega"))
    with pytest.raises(ResultsError, match="different settings"):
        spectrum(tmp_path / "run", model=minilm, resume=True, **_spectrum_kw(corpus))


def test_resume_of_a_finished_spectrum_does_nothing(tmp_path, minilm, monkeypatch):
    import attnlab.spectral.run as sr

    corpus = tmp_path / "c.txt"
    corpus.write_text(_corpus_text("alpha"))
    first = sr.spectrum(tmp_path / "run", model=minilm, **_spectrum_kw(corpus))
    monkeypatch.setattr(sr, "stream_attention", lambda *a, **k: pytest.fail("recomputed a finished run"))
    again = sr.spectrum(tmp_path / "run", model=minilm, resume=True, **_spectrum_kw(corpus))
    assert again["pooled"] == first["pooled"]


# ---------------------------------------------------------------------------------------------- corpora
def test_upper_case_jsonl_is_json_lines(tmp_path):
    p = tmp_path / "DATA.JSONL"
    p.write_text(json.dumps({"text": "hello there"}) + "\n" + json.dumps({"text": "second record"}) + "\n")
    assert list(iter_documents(p)) == ["hello there", "second record"]


def test_hidden_and_binary_extensionless_files_are_skipped(tmp_path):
    (tmp_path / "a.txt").write_text("real text here")
    (tmp_path / ".DS_Store").write_bytes(b"\x00\x01binary")
    (tmp_path / ".git" / "objects").mkdir(parents=True)
    (tmp_path / ".git" / "objects" / "ab").write_bytes(b"\x00\x02zlib")
    (tmp_path / ".hidden.txt").write_text("hidden text")
    (tmp_path / "BLOB").write_bytes(b"\x00\x00\x00")
    assert list(iter_documents(tmp_path)) == ["real text here"]


def test_fifo_corpus_is_refused_without_hanging(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    result = {}

    def read():
        try:
            list(iter_documents(fifo))
        except CorpusError as e:
            result["error"] = str(e)

    t = threading.Thread(target=read, daemon=True)
    t.start()
    t.join(timeout=60)
    if t.is_alive():  # unblock the reader so the test process can end
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
        pytest.fail("reading a FIFO corpus hung")
    assert "not a regular file" in result.get("error", "")


def test_unreadable_corpus_file_is_a_clear_error(tmp_path, monkeypatch):
    from pathlib import Path

    (tmp_path / "a.txt").write_text("fine")
    (tmp_path / "b.txt").write_text("locked")
    real = Path.read_bytes

    def read_bytes(self):
        if self.name == "b.txt":
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    with pytest.raises(CorpusError, match="b.txt: cannot read"):
        list(iter_documents(tmp_path))


def test_small_corpus_is_split_by_windows(tmp_path, minilm, caplog):
    """One file with a few paragraphs: fit and held-out windows both exist and share no window (issue 17)."""
    p = tmp_path / "one.txt"
    p.write_text("\n\n".join(["attention " * 40, "spectrum " * 40, "sparsity " * 40]))
    with caplog.at_level(logging.WARNING, logger="attnlab"):
        fit = token_windows(minilm.tokenizer, 16, p, split="fit")
        held = token_windows(minilm.tokenizer, 16, p, split="heldout")
    assert len(fit) >= 1 and len(held) >= 1
    assert "splitting by windows" in caplog.text and "held out" in caplog.text
    everything = token_windows(minilm.tokenizer, 16, p, split="all")
    assert torch.equal(torch.cat([fit, held]), everything)  # a partition, in order: no shared window


def test_too_small_corpus_fails_upfront(tmp_path, minilm):
    p = tmp_path / "tiny.txt"
    p.write_text("just a few words")
    with pytest.raises(CorpusError, match="at least 2"):
        token_windows(minilm.tokenizer, 16, p, split="heldout")


def test_fewer_windows_warn_and_minimum_is_checked(caplog):
    w = torch.zeros(3, 8, dtype=torch.long)
    with caplog.at_level(logging.WARNING, logger="attnlab"):
        check_windows(w, 256, "--n-sequences", "fit")
    assert "--n-sequences 256 asked" in caplog.text and "only 3" in caplog.text
    with pytest.raises(CorpusError, match="--n-eval 4: only 1 window"):
        check_windows(w[:1], 4, "--n-eval", "heldout", minimum=2)


def test_reconstruct_min_eval_fails_before_fitting(tmp_path, monkeypatch):
    """A corpus with one held-out window: clear error before the (slow) fit, not TV from one window."""
    import attnlab.reconstruct.run as rr

    monkeypatch.setattr(rr, "get_fit", lambda *a, **k: pytest.fail("fitted before checking the held-out split"))
    p = tmp_path / "c.txt"
    p.write_text("word " * 60)  # about 4 windows of 16 tokens: 1 held out
    with pytest.raises(CorpusError, match="--n-eval"):
        rr.reconstruct(tmp_path / "run", seq_len=16, n_fit=4, n_eval=4, corpus=str(p), progress=False)


def test_reconstruct_from_spectrum_with_default_position(tmp_path, caplog):
    """--spectrum RUN with the default --position used to fail late; now the step is skipped with a warning."""
    from attnlab.reconstruct.run import reconstruct
    from attnlab.spectral.run import spectrum

    spectrum(tmp_path / "spec", model="minilm", n_sequences=4, seq_len=16, batch_size=2, layers=[0], heads=[0, 1],
             sketch_size=0, progress=False)
    with caplog.at_level(logging.WARNING, logger="attnlab"):
        res = reconstruct(tmp_path / "rec", seq_len=16, n_eval=2, spectrum=str(tmp_path / "spec"), layers=[0],
                          heads=[0, 1], budgets=[], estimators=["gaussian"], selections=["random"], dropin=False,
                          progress=False)
    assert res["best"] == "gaussian/random" and "position-conditioned gaussian skipped" in caplog.text


def test_cli_warns_when_fewer_windows_are_used(tmp_path, capsys):
    """`spectrum` asked for 256 windows and silently used 4 (issue 17): the CLI now prints a warning."""
    from attnlab.cli import invoke

    p = tmp_path / "c.txt"
    p.write_text(_corpus_text("alpha"))
    code = invoke(["spectrum", "--out", str(tmp_path / "run"), "--corpus", str(p), "--n-sequences", "256",
                   "--seq-len", "16", "--layers", "0", "--heads", "0", "--sketch-size", "0", "--no-report",
                   "--split", "all"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "--n-sequences 256 asked" in err and "using" in err


def test_sparsity_skipped_downstream_is_reported(caplog):
    from attnlab.errors import CorpusError
    from attnlab.sparsity.run import _check_split

    info: dict = {}
    w = torch.zeros(4, 8, dtype=torch.long)
    with caplog.at_level(logging.WARNING, logger="attnlab"):
        _check_split(w, w[:2], 128, 64, 128, info)
    assert "downstream evaluation skipped" in caplog.text and "--n-eval" in info["downstream_skipped"]
    with pytest.raises(CorpusError, match="--n-eval"):
        _check_split(w, w[:1], 128, 64, 128, {})


def test_unwritable_out_is_one_clear_error(tmp_path, monkeypatch):
    """A read-only --out (or parent) is refused before any work (simulated: the tests may run as root)."""
    import attnlab.io as aio
    from attnlab.io import check_out

    monkeypatch.setattr(aio.os, "access", lambda *a, **k: False)
    with pytest.raises(ResultsError, match="not writable"):
        check_out(tmp_path / "run")
    with pytest.raises(ResultsError, match="not writable"):
        check_out(tmp_path / "model.safetensors", kind="file")


# ---- issue 26: file outputs never replace foreign files; spectrum statistics must not leak held-out data ----

def _invoke(args):
    from attnlab.cli import invoke

    return invoke([str(a) for a in args])


@pytest.mark.parametrize("name,content", [("results.json", '{"a": 1}\n'), ("notes.txt", "mine\n"),
                                          ("other.safetensors", "not attnlab\n")])
def test_file_out_refuses_foreign_files(tmp_path, capsys, name, content):
    (tmp_path / "config.json").write_text("{}\n")
    target = tmp_path / name
    target.write_text(content)
    assert _invoke(["sparsity", "train", "--out", target]) != 0
    err = capsys.readouterr().err
    assert "refusing to overwrite" in err or "looks like a file" in err
    assert target.read_text() == content


@pytest.mark.parametrize("cmd, name", [(["sparsity", "train"], "entmax_model.safetensors"),
                                       (["reconstruct", "fit"], None),
                                       (["sparsity", "prefill", "--model", "m"], "prefill.json")])
def test_run_dir_out_refuses_a_foreign_file_inside(tmp_path, capsys, cmd, name):
    """--out DIR: the file the command writes inside DIR is checked too (a foreign one is never replaced)."""
    if name is None:
        from attnlab.reconstruct.fit import FIT_FILE

        name = FIT_FILE
    target = tmp_path / name
    target.write_text("mine\n")
    assert _invoke([*cmd, "--out", tmp_path]) != 0
    assert "refusing to overwrite" in capsys.readouterr().err
    assert target.read_text() == "mine\n"


def test_file_out_may_replace_its_own_output(tmp_path):
    from attnlab.io import OUTPUT_MARK, check_foreign_file, write_json, write_tensors

    write_tensors(tmp_path / "m.safetensors", {"x": torch.zeros(1)}, {"k": 1})
    write_json(tmp_path / "p.json", {OUTPUT_MARK: "sparsity prefill"})
    check_foreign_file(tmp_path / "m.safetensors")
    check_foreign_file(tmp_path / "p.json")


def test_spectrum_fitted_on_heldout_split_is_refused(tmp_path, capsys):
    spec = tmp_path / "spec"
    assert _invoke(["spectrum", "--n-sequences", "4", "--seq-len", "16", "--layers", "0", "--heads", "0",
                    "--sketch-size", "0", "--no-report", "--split", "heldout", "--out", spec]) == 0
    capsys.readouterr()
    code = _invoke(["reconstruct", "run", "--spectrum", spec, "--seq-len", "16", "--layers", "0", "--heads", "0",
                    "--no-position", "--out", tmp_path / "rec"])
    err = capsys.readouterr().err
    assert code == 2 and "leak" in err and "--split fit" in err, err
    assert not (tmp_path / "rec").exists()
