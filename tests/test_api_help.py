"""Help shows every default, --version exists, Python callables show real signatures, library code logs."""

from __future__ import annotations

import inspect
import logging

import pytest
from typer.testing import CliRunner

from attnlab.cli import app

runner = CliRunner()


def test_help_keeps_defaults_and_brackets():
    top = runner.invoke(app, ["--help"]).output
    assert "[command] table (e.g. [spectrum], [reconstruct.run])" in " ".join(top.split())
    for path, want in ((["spectrum"], ["[default: fit]", "[default: 256]", "[default: minilm]"]),
                       (["capture"], ["[default: 8]", "[default: minilm]", "[default: all]"]),
                       (["reconstruct", "run"], ["[default: 0.25]"])):
        text = " ".join(runner.invoke(app, [*path, "--help"], terminal_width=200).output.split())
        for w in want:
            assert w in text, (path, w)
        assert "\\[" not in text  # no Rich escape shown


def test_version():
    import attnlab

    res = runner.invoke(app, ["--version"])
    assert res.exit_code == 0 and res.output.strip() == f"attnlab {attnlab.__version__}"


def test_api_signatures_docs_and_dir():
    import attnlab

    assert "spectrum" in dir(attnlab) and "compare" in dir(attnlab)
    for name, first in (("capture", "out"), ("reconstruct", "out"), ("report", "run_dir"), ("sparsity", "out"),
                        ("variables", "out")):
        obj = getattr(attnlab, name)
        sig = inspect.signature(obj)
        assert list(sig.parameters)[0] == first, (name, sig)
        assert "*args" not in str(sig)
        assert f"attnlab.{name}(" in obj.__doc__  # help() shows the call, then the package
    assert "budget" in inspect.getdoc(attnlab.sparsity.sparse_attention)
    assert "fraction of the key blocks" in inspect.getdoc(attnlab.sparsity.sparse_attention)


def test_library_logs_instead_of_printing(caplog):
    import subprocess
    import sys

    from attnlab.sparsity.run import _log

    with caplog.at_level(logging.INFO, logger="attnlab"):
        _log(False, "hello from the library")
    assert "hello from the library" in caplog.text
    # Used as a library (no CLI handler): nothing on stdout; the CLI's handler shows it.
    code = "import logging, attnlab; logging.getLogger('attnlab.demo').info('hello')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout == ""
    code = "from attnlab.logs import setup_cli_logging; setup_cli_logging(); " + code
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout == "hello\n"


def test_no_print_in_library_code():
    import ast
    from pathlib import Path

    import attnlab

    root = Path(attnlab.__file__).parent
    offenders = []
    for p in root.rglob("*.py"):
        if p.name in ("cli.py", "cli_utils.py", "__main__.py"):
            continue
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "print":
                offenders.append(f"{p.relative_to(root)}:{node.lineno}")
            if isinstance(node, ast.Name) and node.id == "print" and not isinstance(getattr(node, "ctx", None), ast.Store):
                offenders.append(f"{p.relative_to(root)}:{node.lineno}")
    assert not offenders, offenders
