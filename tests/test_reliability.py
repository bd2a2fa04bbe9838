"""Reliability of the substrate: killed runs resume to identical numbers, corrupt files are named, NaN is caught."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from attnlab.capture.hf import AttentionCall
from attnlab.errors import NumericalError, ResultsError, ShapeError
from attnlab.io import RunDir, read_json, read_tensors, write_json, write_tensors
from attnlab.spectral.collector import SpectrumCollector

ARGS = ["spectrum", "--n-sequences", "48", "--seq-len", "48", "--batch-size", "2", "--layers", "0,1",
        "--heads", "0-3", "--sketch-size", "4", "--checkpoint-every", "1", "--no-report"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def _killed_at_checkpoint(args, n: int, sig: signal.Signals) -> subprocess.CompletedProcess:
    """Run the CLI; it signals itself right after its n-th checkpoint (a known point, no sleep, no race)."""
    env = {**ENV, "ATTNLAB_TEST_KILL_AFTER_CHECKPOINT": str(n), "ATTNLAB_TEST_KILL_SIGNAL": sig.name[3:]}
    return subprocess.run([sys.executable, "-m", "attnlab", *args], env=env, capture_output=True, text=True,
                          timeout=600)


def _reference(tmp_path_factory, args):
    """One uninterrupted run shared by the SIGKILL and SIGINT cases."""
    out = tmp_path_factory.mktemp("ref")
    ref = subprocess.run([sys.executable, "-m", "attnlab", *args, "--out", str(out)], env=ENV, capture_output=True,
                         text=True, timeout=600)
    assert ref.returncode == 0, ref.stderr
    return out


@pytest.fixture(scope="module")
def spectrum_ref(tmp_path_factory):
    return _reference(tmp_path_factory, ARGS)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_killed_spectrum_resumes_to_same_numbers(tmp_path, sig, spectrum_ref):
    proc = _killed_at_checkpoint([*ARGS, "--out", str(tmp_path / "run")], 5, sig)
    ckpt = tmp_path / "run" / "spectrum.ckpt.rank0.safetensors"
    assert proc.returncode == (-9 if sig == signal.SIGKILL else 130), proc.stderr
    assert proc.returncode != 0, "the run finished before it could be interrupted"
    if sig == signal.SIGINT:
        assert "--resume" in proc.stderr
    assert ckpt.exists()
    assert read_tensors(ckpt)[1]["batches_done"] == 5  # the checkpoint on disk is whole (atomic writes)
    assert not (tmp_path / "run" / "results.json").exists()
    res = subprocess.run([sys.executable, "-m", "attnlab", *ARGS, "--out", str(tmp_path / "run"), "--resume"],
                         env=ENV, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    a = read_json(spectrum_ref / "results.json")["spectrum"]
    b = read_json(tmp_path / "run" / "results.json")["spectrum"]
    for key in ("per_head", "per_layer", "pooled", "overlap_layers", "full_matrix", "n_rows", "rank_interval"):
        assert json.dumps(a[key], sort_keys=True) == json.dumps(b[key], sort_keys=True), key


def test_resume_with_other_settings_is_refused(tmp_path, minilm):
    from attnlab.spectral.run import spectrum

    kw = dict(n_sequences=4, seq_len=16, batch_size=1, layers=[0], heads=[0], sketch_size=0, progress=False)
    spectrum(tmp_path, model=minilm, checkpoint_every=1, **kw)
    write_tensors(tmp_path / "spectrum.ckpt.rank0.safetensors", {"x": torch.zeros(1)},
                  {"fingerprint": "other", "batches_done": 1})
    with pytest.raises(ResultsError, match="different settings"):
        spectrum(tmp_path, model=minilm, resume=True, **kw)


def test_corrupt_and_truncated_files(tmp_path):
    p = tmp_path / "results.json"
    write_json(p, {"a": 1})
    p.write_text(p.read_text()[:5])
    with pytest.raises(ResultsError, match="corrupt"):
        read_json(p)
    t = tmp_path / "t.safetensors"
    write_tensors(t, {"x": torch.arange(100.0)})
    t.write_bytes(t.read_bytes()[:60])
    with pytest.raises(ResultsError, match="corrupt"):
        read_tensors(t)
    t.write_bytes(b"\x00" * 10)
    with pytest.raises(ResultsError, match="corrupt"):
        read_tensors(t)
    with pytest.raises(ResultsError, match="does not exist"):
        RunDir(tmp_path / "nope", create=False)


def test_nan_json_is_written_as_null(tmp_path):
    write_json(tmp_path / "r.json", {"x": float("nan"), "y": [1.0, float("inf")]})
    assert read_json(tmp_path / "r.json") == {"x": None, "y": [1.0, "inf"]}


def _call(scores_q: torch.Tensor, n: int = 8) -> AttentionCall:
    k = torch.randn(1, 2, n, 4)
    return AttentionCall(0, scores_q, k, k, None, None, 0.5)


def test_nan_or_inf_scores_are_caught():
    col = SpectrumCollector([0], [0, 1], 8, sketch_size=0)
    q = torch.randn(1, 2, 8, 4)
    q[0, 1, 3, 0] = float("nan")
    with pytest.raises(NumericalError, match="layer 0"):
        col(_call(q))
    q = torch.randn(1, 2, 8, 4)
    q[0, 0, 0, 0] = float("inf")
    with pytest.raises(NumericalError):
        col(_call(q))


def test_sequence_length_mismatch_is_caught():
    col = SpectrumCollector([0], [0], 16, sketch_size=0)
    with pytest.raises(ShapeError, match="--seq-len 16"):
        col(_call(torch.randn(1, 2, 8, 4)))


def test_timings_are_split_from_results_and_merged_back(tmp_path):
    from attnlab.io import merge_timings, split_timings

    data = {"seconds": 1.5, "a": [{"x": 1, "fit_seconds": 2.0}, {"x": 2}], "b": {"wall_s": 3.0, "y": "z"}}
    clean, timings = split_timings(data)
    assert clean == {"a": [{"x": 1}, {"x": 2}], "b": {"y": "z"}}
    assert merge_timings(clean, timings) == data
    run = RunDir(tmp_path)
    run.write_section("s", data)
    assert run.section("s") == data
    assert "seconds" not in (tmp_path / "results.json").read_text()


def test_same_seed_gives_byte_identical_results_json(tmp_path, minilm):
    from attnlab.spectral.run import spectrum
    from attnlab.variables.experiment import run_variables

    for name in ("a", "b"):
        spectrum(tmp_path / name, model=minilm, n_sequences=4, seq_len=16, batch_size=2, layers=[0, 5],
                 heads=[0, 1], sketch_size=4, progress=False)
        run_variables(tmp_path / name, task="and", s=2, Ts=[6], seeds=1, probe=False, progress=False,
                      train={"max_steps": 30, "d_model": 16, "n_test": 64, "n_val": 64},
                      search={"m_min": 8, "m_max": 32, "rtol": 0.5})
    assert (tmp_path / "a" / "results.json").read_bytes() == (tmp_path / "b" / "results.json").read_bytes()


VARS = ["variables", "sweep", "--task", "and", "--s", "2", "--T", "6", "8", "10", "12", "--seeds", "2",
        "--max-steps", "60", "--d-model", "16", "--n-test", "128", "--m-min", "8", "--m-max", "128", "--rtol", "0.3",
        "--no-probe"]


def _m_star(run_dir):
    sec = read_json(run_dir / "results.json")["variables"]
    return [(r["T"], r["m_star"], r.get("per_seed")) for r in sec["results"]]


@pytest.fixture(scope="module")
def variables_ref(tmp_path_factory):
    return _reference(tmp_path_factory, VARS)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_killed_variables_sweep_resumes_without_redoing_trials(tmp_path, sig, variables_ref):
    run = tmp_path / "run"
    proc = _killed_at_checkpoint([*VARS, "--out", str(run)], 3, sig)  # after the 3rd trial is written
    trials = run / "variables_trials.json"
    assert proc.returncode == (-9 if sig == signal.SIGKILL else 130), proc.stderr
    done_before = set(read_json(trials)["trials"])  # the trial file on disk is whole (atomic writes)
    total = set(read_json(variables_ref / "variables_trials.json")["trials"])
    assert 0 < len(done_before) < len(total)  # killed mid-sweep, right after its 3rd trial-file write
    res = subprocess.run([sys.executable, "-m", "attnlab", *VARS, "--out", str(run), "--resume"], env=ENV,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    assert _m_star(run) == _m_star(variables_ref)
    after = read_json(trials)["trials"]
    assert done_before <= set(after)
    assert set(after) == set(read_json(variables_ref / "variables_trials.json")["trials"])


# ---- corpora that read wrong, hangs (issue 26) --------------------------------------------------------------

@pytest.fixture(scope="module")
def tok():
    from attnlab.sources.loading import load_tokenizer

    return load_tokenizer("minilm")


_PARAS = [" ".join(f"word{i}_{j}" for j in range(12)) for i in range(12)]


@pytest.mark.parametrize("nl", ["\r\n", "\r"])
def test_crlf_and_cr_text_split_like_lf(tmp_path, nl):
    from attnlab.capture.corpus import iter_documents

    (tmp_path / "lf.txt").write_bytes("\n\n".join(_PARAS).encode())
    (tmp_path / "other.txt").write_bytes((nl * 2).join(p.replace(" ", nl if p is _PARAS[0] else " ")
                                                        for p in _PARAS).encode())
    lf = list(iter_documents(tmp_path / "lf.txt"))
    other = list(iter_documents(tmp_path / "other.txt"))
    assert len(lf) == len(other) == len(_PARAS)
    assert other[1:] == lf[1:]


def test_jsonl_with_only_empty_texts_is_an_error(tmp_path, tok):
    from attnlab.capture.corpus import token_windows
    from attnlab.errors import CorpusError

    p = tmp_path / "c.jsonl"
    p.write_text("\n".join(json.dumps({"text": t}) for t in ["", "  ", "\n"] * 50))
    for split in ("all", "fit"):
        with pytest.raises(CorpusError, match="empty|window"):
            token_windows(tok, 16, p, split=split)


def test_stdlib_corpus_with_a_stdlib_folder_is_ambiguous(tmp_path, monkeypatch):
    from attnlab.capture.corpus import iter_documents
    from attnlab.errors import CorpusError

    monkeypatch.chdir(tmp_path)
    (tmp_path / "stdlib").mkdir()
    (tmp_path / "stdlib" / "a.txt").write_text("\n\n".join(_PARAS))
    with pytest.raises(CorpusError, match="ambiguous.*--corpus ./stdlib"):
        next(iter_documents("stdlib"))
    assert len(list(iter_documents("./stdlib"))) == len(_PARAS)
    assert next(iter_documents(None))  # no --corpus: the docstrings


def test_model_folder_without_tokenizer_files_is_refused(tmp_path):
    from transformers import BertConfig, BertModel

    from attnlab.errors import ModelError
    from attnlab.sources.loading import load_model, load_tokenizer

    BertModel(BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=16, max_position_embeddings=32)).save_pretrained(tmp_path / "m")
    for call in (lambda: load_model(str(tmp_path / "m")), lambda: load_tokenizer(str(tmp_path / "m"), "--tokenizer")):
        with pytest.raises(ModelError, match="no tokenizer files"):
            call()


def test_bad_minilm_dir_is_named(monkeypatch, tmp_path):
    from attnlab.errors import ModelError
    from attnlab.sources.hf import resolve_model_path

    monkeypatch.setenv("ATTNLAB_MINILM_DIR", str(tmp_path / "missing"))
    with pytest.raises(ModelError, match="ATTNLAB_MINILM_DIR"):
        resolve_model_path("minilm")


def test_one_long_line_tokenises_in_linear_time(tmp_path, tok):
    """CPU time of 8x the text stays well under 8^2 x (the old window cutting copied the rest of the buffer
    for every window: quadratic). Minimum of a few repeats; process time, so a loaded machine does not matter."""
    import time

    from attnlab.capture.corpus import token_windows

    words = "alpha beta gamma delta epsilon zeta eta theta "
    sizes = {}
    for kb in (100, 800):
        p = tmp_path / f"c{kb}.txt"
        p.write_text(words * (kb * 1024 // len(words)))
        best = float("inf")
        for _ in range(3):
            t = time.process_time()
            w = token_windows(tok, 8, p)
            best = min(best, time.process_time() - t)
        sizes[kb] = (best, len(w))
    assert sizes[800][1] > 7 * sizes[100][1]
    ratio = sizes[800][0] / max(sizes[100][0], 1e-3)
    assert ratio < 24, f"8x the text took {ratio:.1f}x the time"


def test_views_on_a_prime_token_count_uses_real_tiles(tmp_path, minilm):
    from attnlab.io import read_tensors
    from attnlab.report.views import attention_views

    meta = attention_views(tmp_path, " ".join(["hello"] * 249), minilm, layers=[0], heads=[0])
    assert meta["seq_len"] == 251 and meta["block_size"] >= 4
    blocks = read_tensors(tmp_path / "views.safetensors")[0]["blocks.0"]
    assert blocks.shape[-1] <= 9


def test_views_max_tokens_must_be_positive(tmp_path, minilm):
    from attnlab.errors import ConfigError
    from attnlab.report.views import attention_views

    with pytest.raises(ConfigError, match="--max-tokens"):
        attention_views(tmp_path, "The cat sat on the mat.", minilm, layers=[0], heads=[0], max_tokens=-3)
