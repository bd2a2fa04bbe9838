"""Bad or edge command-line input (issue 18): one clear line naming the flag and exit code 2, before any work.

Every case runs in-process through ``attnlab.cli.invoke`` (the same path as the `attnlab` entry point).
"""

from __future__ import annotations

import pytest
import torch

from attnlab.cli import invoke


def _run(args, capsys):
    code = invoke([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def out(tmp_path):
    return tmp_path / "run"


CASES = [
    # non-finite and out-of-range numbers (issue 18 items 4, tracebacks, messages)
    (["reconstruct", "run", "--ridge", "nan"], "--ridge"),
    (["reconstruct", "run", "--ridge", "inf"], "--ridge"),
    (["reconstruct", "run", "--jitter", "-1"], "--jitter"),
    (["reconstruct", "train", "--seq-len", "1"], "--seq-len"),
    (["reconstruct", "train", "--lr", "nan"], "--lr"),
    (["variables", "train", "--lr", "inf"], "--lr"),
    (["variables", "train", "--lr", "nan"], "--lr"),
    (["variables", "train", "--weight-decay", "nan"], "--weight-decay"),
    (["variables", "train", "--d-model", "0"], "--d-model"),
    (["variables", "train", "--seed", "99999999999999999999"], "--seed"),
    (["variables", "sweep", "--budget-s", "-1", "--out", "{out}"], "--budget-s"),
    (["sparsity", "train", "--alpha", "inf", "--out", "{out}.safetensors"], "--alpha"),
    (["sparsity", "train", "--alpha", "1.0", "--out", "{out}.safetensors"], "--alpha"),
    (["sparsity", "run", "--rank", "0", "--out", "{out}"], "--rank"),
    (["capture", "--out", "{out}", "--batch-size", "0"], "--batch-size"),
    (["capture", "--out", "{out}", "--batch-size", "-3"], "--batch-size"),
    (["spectrum", "--out", "{out}", "--layers", "5-0"], "--layers"),
    # devices
    (["spectrum", "--out", "{out}", "--device", "banana"], "--device"),
    (["capture", "--out", "{out}", "--device", "mps"], "--device"),
    (["sparsity", "run", "--out", "{out}", "--device", "banana"], "--device"),
    # output locations (items 6 and tracebacks)
    (["spectrum", "--out", ""], "--out"),
    (["reconstruct", "run", "--out", ""], "--out"),
    (["spectrum", "--out", "{file}"], "--out"),
    (["spectrum", "--out", "{file}/sub"], "{file}"),
    (["sparsity", "train", "--out", "{tmp}/model.json"], "--out"),  # a directory is fine, a non-checkpoint file is not
    (["spectrum", "--out", "{tmp}/results.json"], "--out"),  # a run directory, not a file
]


@pytest.mark.parametrize("args,flag", CASES, ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_bad_input_is_one_line_exit_2(args, flag, tmp_path, out, capsys):
    f = tmp_path / "a_file"
    f.write_text("x")
    fmt = {"out": out, "file": f, "tmp": tmp_path}
    code, stdout, err = _run([a.format(**fmt) for a in args], capsys)
    assert code == 2, (stdout, err)
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert flag.format(**fmt) in lines[0]
    if args[:2] == ["sparsity", "train"] and "1.0" in args:
        assert "--attention" not in err  # that command has no --attention (issue 18, misleading messages)


def test_cuda_without_cuda_is_one_line(out, capsys):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    code, _, err = _run(["spectrum", "--out", out, "--device", "cuda"], capsys)
    assert code == 2 and "CUDA is not available" in err and "Traceback" not in err


def test_config_type_error_names_config(tmp_path, out, capsys):
    cfg = tmp_path / "c.toml"
    cfg.write_text('[spectrum]\nseq-len = "many"\n')
    code, _, err = _run(["spectrum", "--config", cfg, "--out", out], capsys)
    assert code == 2 and "--config" in err and "seq-len" in err and "Traceback" not in err


def test_empty_sweep_is_an_error(out, capsys):
    """--budget-s 0 runs no T: exit 2 with a hint to raise --budget-s (was: exit 0)."""
    code, _, err = _run(["variables", "sweep", "--budget-s", "0", "--T", "8", "--s", "2", "--seeds", "1",
                         "--no-probe", "--out", out], capsys)
    assert code == 2 and "raise --budget-s" in err


def test_sparsity_train_out_is_a_run_directory(tmp_path, capsys, monkeypatch):
    """--out DIR writes DIR/entmax_model.safetensors; a path that looks like another file fails before training."""
    import attnlab.sparsity.train_entmax as te

    seen = []
    monkeypatch.setattr(te, "train_and_save", lambda cfg, out, **k: seen.append(out) or (None, None,
                                                                                         {"loss": [1.0], "seconds": 0}))
    code, _, err = _run(["sparsity", "train", "--out", str(tmp_path / "m.json"), "--steps", "1"], capsys)
    assert code == 2 and "looks like a file" in err and not seen
    code, out, err = _run(["sparsity", "train", "--out", str(tmp_path), "--steps", "1"], capsys)
    assert code == 0, err
    assert seen == [str(tmp_path / "entmax_model.safetensors")] and "--checkpoint" in out


def test_text_field_option_exists(tmp_path, capsys):
    """The jsonl error suggests --text-field: the option exists on the CLI and in TOML."""
    from attnlab.cli import default_map

    for cmd in ("spectrum", "capture"):
        code, stdout, _ = _run([cmd, "--help"], capsys)
        assert code == 0 and "--text-field" in stdout
    cfg = tmp_path / "c.toml"
    cfg.write_text('[spectrum]\ntext-field = "body"\n')
    assert default_map(str(cfg))["spectrum"]["text_field"] == "body"


def test_interrupt_message_fits_the_command(monkeypatch, out, capsys):
    """Ctrl-C: commands that continue an interrupted run say --resume; `reconstruct run` (its --resume only keeps a
    finished section) does not (exit 130)."""
    import attnlab.reconstruct.run as rr

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(rr, "reconstruct", interrupted)
    code, _, err = _run(["reconstruct", "run", "--out", out], capsys)
    assert code == 130 and "interrupted" in err and "--resume" not in err


@pytest.mark.parametrize("args,flag", [
    (["variables", "train", "--T", "100000"], "--T 100000"),
    (["spectrum", "--out", "{out}", "--heads", "0-100000000"], "--heads"),
])
def test_huge_sizes_are_refused_up_front(args, flag, out, capsys):
    code, _, err = _run([a.format(out=out) for a in args], capsys)
    assert code == 2 and flag in err and ("GiB" in err or "more than" in err)


def test_report_on_a_malformed_section_exits_2(tmp_path, capsys):
    from attnlab.io import write_json

    write_json(tmp_path / "results.json", {"spectrum": {"nonsense": 1}})
    code, _, err = _run(["report", tmp_path], capsys)
    assert code == 2 and "spectrum" in err and "could not be rendered" in err
    assert (tmp_path / "report.html").exists()  # the other sections are still written


def test_hf_seq_len_above_model_maximum(out, capsys):
    code, _, err = _run(["sparsity", "run", "--model", "minilm", "--hf-seq-len", "4096", "--out", out], capsys)
    assert code == 2 and "--hf-seq-len 4096" in err and "maximum" in err


@pytest.mark.parametrize("args,flag", [
    (["reconstruct", "train", "--out", "{out}", "--selections", "bogus"], "--selections"),
    (["reconstruct", "train", "--out", "{out}", "--estimator", "bogus"], "--estimators"),
    (["reconstruct", "train", "--out", "{out}", "--budgets", "500"], "--budgets 500"),
    (["reconstruct", "run", "--out", "{out}", "--proxy", "bogus"], "--proxy"),
    (["sparsity", "run", "--out", "{out}", "--loss", "bogus"], "--loss"),
])
def test_names_and_budgets_checked_before_work(args, flag, out, capsys, monkeypatch):
    """Validation that used to happen after minutes of fitting/training now happens first."""
    import attnlab.sources.hf as hf
    import attnlab.reconstruct.train as rt
    import attnlab.sparsity.train_entmax as te

    def no_work(*a, **k):
        raise AssertionError("started work before validating the options")

    for mod, name in ((rt, "char_windows"), (te, "train_and_save"), (hf, "load_model")):
        monkeypatch.setattr(mod, name, no_work)
    code, _, err = _run([a.format(out=out) for a in args], capsys)
    assert code == 2 and flag in err, err


def test_library_configs_reject_non_finite_values():
    """The same rules guard the Python API (config dataclasses), not only the CLI."""
    from attnlab.errors import ConfigError
    from attnlab.reconstruct.run import ReconstructConfig
    from attnlab.sparsity.train_entmax import EntmaxTrainConfig
    from attnlab.spectral.run import SpectrumConfig
    from attnlab.variables.train import TrainConfig

    with pytest.raises(ConfigError, match="--ridge"):
        ReconstructConfig(ridge=float("nan")).validate()
    with pytest.raises(ConfigError, match="--weight-decay"):
        TrainConfig(weight_decay=float("nan"))
    with pytest.raises(ConfigError, match="--alpha"):
        EntmaxTrainConfig(alpha=float("inf"))
    with pytest.raises(ConfigError, match="--seq-len"):
        SpectrumConfig(seq_len=1).validate()


# ---- issue 26: options that changed the experiment silently, divergence, refused runs leave nothing --------

SILENT = [
    (["reconstruct", "train", "--seeds", "0,0", "--out", "{out}"], "--seeds"),
    (["sparsity", "run", "--targets", "2,nan,-1", "--out", "{out}"], "--targets"),
    (["sparsity", "run", "--targets", "0.5,nan", "--out", "{out}"], "--targets"),
    (["reconstruct", "run", "--frontier-budgets", "0", "--out", "{out}"], "--frontier-budgets"),
    (["reconstruct", "run", "--frontier-budgets", "-1", "--out", "{out}"], "--frontier-budgets"),
    (["reconstruct", "run", "--frontier-budgets", "5", "--out", "{out}"], "--frontier-budgets"),
    (["reconstruct", "run", "--frontier-budgets", "0.25,nan", "--out", "{out}"], "--frontier-budgets"),
]


@pytest.mark.parametrize("args,flag", SILENT)
def test_list_options_are_checked_and_refusal_leaves_no_directory(args, flag, tmp_path, capsys):
    out = tmp_path / "new" / "run"
    code, _, err = _run([a.replace("{out}", str(out)) for a in args], capsys)
    assert code == 2 and flag in err and "Traceback" not in err, err
    assert not (tmp_path / "new").exists(), "a refused command left a directory (with its lock) behind"


@pytest.mark.parametrize("toml,word", [("n_sequences = true\n", "true/false"),
                                       ("seq-len = 16\nseq_len = 32\n", "twice")])
def test_toml_bools_for_numbers_and_double_keys_are_refused(toml, word, tmp_path, capsys):
    cfg = tmp_path / "c.toml"
    cfg.write_text("[spectrum]\n" + toml)
    code, _, err = _run(["--config", cfg, "spectrum", "--out", tmp_path / "run"], capsys)
    assert code == 2 and word in err, err


def test_library_list_checks():
    from attnlab.errors import ConfigError
    from attnlab.validate import check_option

    with pytest.raises(ConfigError, match="--seeds lists 0 twice"):
        check_option("seeds", [0, 0])
    with pytest.raises(ConfigError, match="--n-sequences"):
        check_option("n_sequences", True)
    assert check_option("seeds", [0, 1]) == [0, 1]


def test_reconstruct_train_divergence_is_an_error_naming_lr(tmp_path, capsys):
    code, _, err = _run(["reconstruct", "train", "--lr", "1e6", "--steps", "3", "--out", tmp_path / "run"], capsys)
    assert code != 0 and "--lr" in err and "diverged" in err, err
    assert not (tmp_path / "run" / "results.json").exists()


def test_lm_train_divergence_saves_no_model(tmp_path, capsys):
    out = tmp_path / "lm"
    code, _, err = _run(["lm", "train", "--preset", "tiny", "--lr", "1e6", "--steps", "3", "--max-bytes", "200000",
                         "--seq-len", "64", "--long-frac", "0", "--device", "cpu", "--out", out], capsys)
    assert code != 0 and "--lr" in err and "diverged" in err, err
    assert not (out / "model.safetensors").exists()
