"""Issue 26, the rest of round 3: Python-API type checks, names of the flags in messages, run files checked before
work, resume after a failed write, views kept by spectrum, damaged sections, a broken cache, demo --quick sizes."""

from __future__ import annotations

import json

import pytest
import torch

from attnlab.errors import ConfigError, ResultsError


# ------------------------------------------------------------------------------------------- Python API types
@pytest.mark.parametrize("kw, flag", [
    (dict(seq_len=16.5), "--seq-len"),
    (dict(layers="0-2"), "--layers"),
    (dict(n_sequences=True), "--n-sequences"),
    (dict(device="gpu"), "--device"),
    (dict(heads=[0, "1"]), "--heads"),
])
def test_spectrum_config_refuses_wrong_types(kw, flag):
    from attnlab.spectral.run import SpectrumConfig

    with pytest.raises(ConfigError, match=flag):
        SpectrumConfig(**kw).validate()


def test_integral_float_for_an_int_option_is_taken_as_int():
    from attnlab.spectral.run import SpectrumConfig

    cfg = SpectrumConfig(seq_len=32.0)
    cfg.validate()
    assert cfg.seq_len == 32 and isinstance(cfg.seq_len, int)


def test_capture_refuses_batch_size_zero_before_the_model():
    from attnlab.capture.dump import capture_scores

    with pytest.raises(ConfigError, match="batch-size"):
        capture_scores(None, torch.zeros(2, 8, dtype=torch.long), batch_size=0)


def test_report_of_none_names_the_argument():
    import attnlab

    with pytest.raises(ConfigError, match="run_dir"):
        attnlab.report(None)


def test_overlong_out_component_is_a_config_error(tmp_path):
    from attnlab.io import check_out

    with pytest.raises(ConfigError, match="over the file system"):
        check_out(tmp_path / ("x" * 300))


def test_spectrum_refuses_float_windows(tmp_path, minilm):
    from attnlab.spectral.run import spectrum

    with pytest.raises(ConfigError, match="integer token ids"):
        spectrum(tmp_path / "r", model=minilm, windows=torch.rand(2, 16), seq_len=16, progress=False)


# ------------------------------------------------------------------------------------------ flags in messages
def test_extra_ranks_error_names_extra_ranks():
    from attnlab.reconstruct.run import ReconstructConfig, check_ranks

    with pytest.raises(ConfigError, match="--extra-ranks 999"):
        check_ranks(ReconstructConfig(extra_ranks=[999]), 32)
    check_ranks(ReconstructConfig(extra_ranks=[8]), 32)  # in range: no error


def test_norm_T_error_names_norm_T():
    from attnlab.variables.experiment import SweepConfig

    with pytest.raises(ConfigError, match="--norm-T"):
        SweepConfig(Ts=[8], norm_T=0).validate()


@pytest.mark.parametrize("name", ["m", "m_max", "n_test"])
def test_variables_sizes_are_bounded(name):
    from attnlab.validate import check_option

    with pytest.raises(ConfigError, match=name.replace("_", "-")):
        check_option(name, 10**9)
    assert check_option(name, 1000) == 1000


def test_corrupt_json_message_does_not_mention_resume(tmp_path):
    from attnlab.io import read_json

    p = tmp_path / "results.json"
    p.write_text("{broken")
    with pytest.raises(ResultsError) as e:
        read_json(p)
    assert "--resume" not in str(e.value) and "delete it" in str(e.value)


# --------------------------------------------------------------------------------- run files before any work
@pytest.mark.parametrize("name, text", [("results.json", "{not json"), ("config.json", "[1, 2]"),
                                        ("timings.json", "\"text\"")])
def test_damaged_run_file_fails_when_the_run_opens(tmp_path, name, text):
    from attnlab.io import RunDir

    (tmp_path / name).write_text(text)
    with pytest.raises(ResultsError, match=name):
        RunDir(tmp_path)


def test_sparsity_table_on_a_damaged_section(tmp_path):
    from typer.testing import CliRunner

    from attnlab.cli import app

    (tmp_path / "results.json").write_text(json.dumps({"sparsity": {"methods": {}}}))
    r = CliRunner().invoke(app, ["sparsity", "table", "--out", str(tmp_path)])
    assert r.exit_code == 2 and "damaged" in r.output and "Traceback" not in r.output


def test_broken_cache_fails_before_finetuning(tmp_path, monkeypatch):
    from attnlab.sparsity.finetune_hf import check_cache_dir

    blocker = tmp_path / "file"
    blocker.write_text("x")
    monkeypatch.setenv("ATTNLAB_CACHE", str(blocker / "sub"))
    with pytest.raises(ConfigError, match="ATTNLAB_CACHE"):
        check_cache_dir()
    monkeypatch.setenv("ATTNLAB_CACHE", str(tmp_path / "ok"))
    assert check_cache_dir().is_dir()


# --------------------------------------------------------------------------------------------- demo --quick
@pytest.mark.parametrize("args, want", [([], (64, 128)), (["--quick"], (16, 64)),
                                        (["--quick", "--n-sequences", "2", "--seq-len", "24"], (2, 24))])
def test_demo_quick_keeps_explicit_sizes(tmp_path, monkeypatch, args, want):
    from typer.testing import CliRunner

    import attnlab.demo as demo
    from attnlab.cli import app

    seen = {}

    def fake(out, n_sequences, seq_len, quick, pillars, **_):
        seen.update(n=n_sequences, s=seq_len)
        raise ConfigError("stop here")

    monkeypatch.setattr(demo, "run_demo", fake)
    CliRunner().invoke(app, ["demo", "--out", str(tmp_path / "d"), *args])
    assert (seen["n"], seen["s"]) == want


# ------------------------------------------------------------------------- resume after a failed write; views
def _corpus(tmp_path):
    p = tmp_path / "c.txt"
    p.write_text("\n\n".join(f"Paragraph {i} has a few plain words of text for the windows." for i in range(40)))
    return str(p)


def test_resume_after_a_failed_write_recomputes(tmp_path, minilm, monkeypatch):
    """Run A finishes; run B (another seq_len) writes its tensors and dies before results.json; resuming B must
    not return A's section."""
    import attnlab.io as io
    from attnlab.spectral.run import spectrum

    kw = dict(corpus=_corpus(tmp_path), n_sequences=2, batch_size=1, layers=[0], heads=[0], sketch_size=0,
              progress=False)
    run = tmp_path / "run"
    spectrum(run, model=minilm, seq_len=16, **kw)

    def fail(self, name, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(io.RunDir, "write_section", fail)
    with pytest.raises(OSError):
        spectrum(run, model=minilm, seq_len=24, **kw)
    monkeypatch.undo()
    res = spectrum(run, model=minilm, seq_len=24, resume=True, **kw)
    assert res["config"]["seq_len"] == 24


def test_spectrum_keeps_views_of_your_text(tmp_path, minilm):
    from attnlab.io import read_tensors
    from attnlab.report.views import attention_views
    from attnlab.spectral.run import spectrum

    run = tmp_path / "run"
    attention_views(str(run), "The cat sat on the mat.", model=minilm, layers=[0], heads=[0])
    before = read_tensors(run / "views.safetensors")[1]["source"]
    spectrum(run, model=minilm, seq_len=16, corpus=_corpus(tmp_path), n_sequences=2, batch_size=1, layers=[0],
             heads=[0], sketch_size=0, progress=False)
    assert before == "your text" == read_tensors(run / "views.safetensors")[1]["source"]


def test_topk_at_row_length_is_refused():
    from attnlab.reconstruct.run import ReconstructConfig

    with pytest.raises(ConfigError, match="--topk 16"):
        ReconstructConfig(seq_len=16, topk=16).validate()
    ReconstructConfig(seq_len=16, topk=5).validate()


def test_n_down_zero_section_renders(tmp_path):
    """--n-down 0 (skip the downstream step) writes a section the report renders without a failure note."""
    from attnlab.report.html import render_report
    from attnlab.sparsity import sparsity
    from attnlab.sparsity.train_entmax import EntmaxTrainConfig

    cfg = EntmaxTrainConfig(objective="clm", seq_len=24, vocab_size=256, d_model=32, n_heads=2, n_layers=2, steps=4,
                            batch_size=8, max_windows=64, seed=0)
    info = sparsity(tmp_path, train=cfg, methods=["window", "oracle-topk"], n_fit=8, n_eval=4, n_down=0, epochs=1,
                    quiet=True)
    assert info["complete"] and "not requested" in info["downstream"]["skipped"]
    page = render_report(tmp_path, strict=True).read_text()
    assert "Sparsefinder" in page or "sparsity" in page.lower()
