"""CLI: help everywhere, config precedence, clear one-line errors, report rendering."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from attnlab.cli import app, parse_int_list
from attnlab.config import load_config_file, merge
from attnlab.errors import ConfigError

runner = CliRunner()


def _commands():
    import click
    import typer.main

    root = typer.main.get_command(app)
    out = []

    def walk(cmd, path):
        out.append(path)
        if isinstance(cmd, click.Group):
            for name, sub in cmd.commands.items():
                walk(sub, path + [name])

    walk(root, [])
    return out


@pytest.mark.parametrize("path", _commands(), ids=lambda p: " ".join(p) or "attnlab")
def test_every_command_has_help(path):
    res = runner.invoke(app, [*path, "--help"])
    assert res.exit_code == 0, res.output
    assert len(res.output.strip()) > 80


def test_help_is_fast_and_does_not_import_torch():
    code = "import sys, attnlab.cli; assert 'torch' not in sys.modules, 'torch imported by the CLI module'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_parse_int_list():
    assert parse_int_list("0,2-4", "--layers") == [0, 2, 3, 4]
    assert parse_int_list([1, 2], "--layers") == [1, 2]
    assert parse_int_list(None, "--layers") is None
    with pytest.raises(ConfigError, match="--heads"):
        parse_int_list("a-b", "--heads")


def test_config_precedence(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('[spectrum]\nseq-len = 64\nn_sequences = 10\n')
    file_values = load_config_file(f, "spectrum")
    merged = merge({"seq_len": 128, "n_sequences": 256, "seed": 0}, file_values, {"n_sequences": 20, "seed": None})
    assert merged == {"seq_len": 64, "n_sequences": 20, "seed": 0}
    f.write_text('[spectrum]\nbogus = 1\n')
    with pytest.raises(ConfigError, match="unknown keys"):
        merge({"seq_len": 128}, load_config_file(f, "spectrum"), {})
    f.write_text('not = [toml')
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config_file(f, "spectrum")
    with pytest.raises(ConfigError, match="no such file"):
        load_config_file(tmp_path / "missing.toml", "spectrum")


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "attnlab", *args], capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("args,needle", [
    (["spectrum", "--out", "{tmp}/x", "--seq-len", "100000"], "--seq-len"),
    (["spectrum", "--out", "{tmp}/x", "--model", "./nope"], "--model"),
    (["spectrum", "--out", "{tmp}/x", "--corpus", "{tmp}/missing.txt"], "--corpus"),
    (["spectrum", "--out", "{tmp}/x", "--layers", "9", "--n-sequences", "2"], "--layers"),
    (["spectrum", "--out", "{tmp}/x", "--heads", "0-40", "--n-sequences", "2"], "--heads"),
    (["spectrum", "--out", "{tmp}/x", "--sketch-size", "1"], "--sketch-size"),
    (["capture", "--out", "{tmp}/x", "--n-sequences", "0"], "--n-sequences"),
    (["report", "{tmp}/no-such-run"], "does not exist"),
])
def test_bad_input_raises_named_error(tmp_path, args, needle):
    from attnlab.errors import AttnlabError

    res = runner.invoke(app, [a.format(tmp=tmp_path) for a in args])
    assert isinstance(res.exception, AttnlabError), res.output
    assert needle in str(res.exception)


def test_error_is_one_line_with_exit_code_2(tmp_path):
    res = _cli("spectrum", "--out", str(tmp_path / "x"), "--seq-len", "100000")
    assert res.returncode == 2, res.stderr
    assert res.stderr.startswith("error: --seq-len 100000") and "Traceback" not in res.stderr


def test_cli_capture_spectrum_report(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text("[spectrum]\nn-sequences = 4\nseq-len = 32\nlayers = [0, 1]\nsketch-size = 4\n")
    res = _cli("spectrum", "--out", str(tmp_path / "run"), "--config", str(cfg), "--heads", "0-3")
    assert res.returncode == 0, res.stderr
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["spectrum"]["layers"] == [0, 1] and results["spectrum"]["heads"] == [0, 1, 2, 3]
    assert results["spectrum"]["seq_len"] == 32
    html = (tmp_path / "run" / "report.html").read_text()
    assert "data:image/png;base64," in html and "Spectrum" in html
    assert not re.search(r'src="[^d][^"]*\.png"', html), "every image must be embedded"
    res = _cli("capture", "--out", str(tmp_path / "run"), "--n-sequences", "2", "--seq-len", "16", "--layers", "5",
               "--with-qk")
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "run" / "capture.safetensors").exists()


def test_corrupt_results_file_is_reported(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "results.json").write_text('{"spectrum": {"trunc')
    res = _cli("report", str(run))
    assert res.returncode == 2 and "corrupt" in res.stderr
