"""CLI: help everywhere, config precedence, clear one-line errors, report rendering."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from attnlab.cli import app, parse_int_list
from attnlab.config import merge
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


def test_config_file_for_every_command(tmp_path):
    from attnlab.cli import default_map, split_config_flag

    f = tmp_path / "c.toml"
    f.write_text('[spectrum]\nseq-len = 64\nlayers = [0, 1]\n[variables.sweep]\ns = 2\nT = ["8", "16"]\n'
                 '[reconstruct.run]\nbudget = 0.5\n')
    dm = default_map(str(f))
    assert dm == {"spectrum": {"seq_len": 64, "layers": "0,1"}, "variables": {"sweep": {"s": 2, "T": ["8", "16"]}},
                  "reconstruct": {"run": {"budget": 0.5}}}
    assert split_config_flag(["spectrum", "--config", "x.toml", "--out", "o"]) == (["spectrum", "--out", "o"], "x.toml")
    assert split_config_flag(["--config=x.toml", "report", "r"]) == (["report", "r"], "x.toml")
    f.write_text('[spectrum]\nbogus = 1\n')
    with pytest.raises(ConfigError, match="no option 'bogus'"):
        default_map(str(f))
    f.write_text('[nosuchcommand]\nx = 1\n')
    with pytest.raises(ConfigError, match="not a command"):
        default_map(str(f))
    f.write_text('not = [toml')
    with pytest.raises(ConfigError, match="invalid TOML"):
        default_map(str(f))
    with pytest.raises(ConfigError, match="no such file"):
        default_map(str(tmp_path / "missing.toml"))
    assert merge({"a": 1, "b": 2}, {}, {"a": 5, "b": None}) == {"a": 5, "b": 2}


def test_flags_override_config_file(tmp_path, monkeypatch):
    """The file gives defaults, a flag on the command line wins (checked on the variables sweep command)."""
    import attnlab.variables.experiment as experiment
    from attnlab.cli import run_cli

    seen = {}

    def fake_run_sweep(cfg, out, **kw):
        seen["cfg"] = cfg
        return {"results": [], "skipped_T": []}

    monkeypatch.setattr(experiment, "run_sweep", fake_run_sweep)
    f = tmp_path / "c.toml"
    f.write_text('[variables.sweep]\ns = 2\nseeds = 4\nT = ["8", "16"]\n')
    try:
        run_cli(["variables", "sweep", "--config", str(f), "--seeds", "1", "--out", str(tmp_path / "o")])
    except SystemExit as e:
        assert e.code in (0, None)
    assert seen["cfg"].s == 2 and seen["cfg"].Ts == [8, 16] and seen["cfg"].seeds == 1


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
    # the app is hardened however it is invoked (CliRunner too): one 'error:' line naming the flag, exit code 2
    res = runner.invoke(app, [a.format(tmp=tmp_path) for a in args])
    assert res.exit_code == 2, res.output
    assert "error:" in res.output and needle in res.output


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


def test_cli_config_does_not_import_cli():
    """cli.py imports cli_config; the other way round would be an import circle (parse_int_list lives in cli_utils)."""
    import ast
    from pathlib import Path

    import attnlab.cli_config as cc

    tree = ast.parse(Path(cc.__file__).read_text())
    mods = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert "cli" not in mods and "attnlab.cli" not in mods
    from attnlab.cli import parse_int_list as a
    from attnlab.cli_utils import parse_int_list as b

    assert a is b  # the old import path keeps working


def test_sub_apps_are_hardened_without_their_own_error_wrappers(tmp_path):
    """A pillar's own Typer app (as tests and notebooks invoke it) reports attnlab errors like `attnlab ...` does,
    so the commands need no `except AttnlabError: fail(e)` of their own."""
    from attnlab.reconstruct.cli import app as rapp

    res = runner.invoke(rapp, ["train", "--out", str(tmp_path / "o"), "--seeds", "a"])
    assert res.exit_code == 2 and "error:" in res.output and "--seeds" in res.output
