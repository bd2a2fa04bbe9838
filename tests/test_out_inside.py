"""The foreign-file check of an output lives in one place, io.lock_output: a file --out itself, or the file a
command writes inside its run directory --out (declared with cli_utils.out_files(inside=...))."""

from __future__ import annotations

import pytest

from attnlab.errors import ResultsError
from attnlab.io import OUTPUT_MARK, lock_output, write_json


def test_lock_output_checks_the_file_inside_a_run_directory(tmp_path):
    (tmp_path / "prefill.json").write_text('{"mine": 1}\n')
    with pytest.raises(ResultsError, match="refusing to overwrite"):
        with lock_output(tmp_path, inside="prefill.json"):
            pass
    with lock_output(tmp_path, inside="other.json"):  # absent: fine
        pass
    with lock_output(tmp_path):  # nothing declared: nothing checked
        pass
    write_json(tmp_path / "prefill.json", {OUTPUT_MARK: "sparsity prefill"})
    with lock_output(tmp_path, inside="prefill.json"):  # attnlab's own output may be replaced
        pass


def test_commands_declare_the_file_they_write_inside():
    """The declared names are the files the commands write (a renamed constant would silently lose the check)."""
    import typer.main

    from attnlab.cli import app
    from attnlab.reconstruct.fit import FIT_FILE
    from attnlab.sparsity.entmax_models import CHECKPOINT

    root = typer.main.get_command(app)
    want = {("sparsity", "train"): CHECKPOINT, ("reconstruct", "fit"): FIT_FILE, ("sparsity", "prefill"): "prefill.json"}
    for (group, name), inside in want.items():
        cb = root.commands[group].commands[name].callback
        cb = getattr(cb, "__wrapped__", cb)
        assert getattr(cb, "_attnlab_out_inside", None) == inside, (group, name)
    from attnlab.blocksparse import cli as bcli
    from attnlab.reconstruct import cli as rcli
    from attnlab.sparsity import cli as scli

    for mod in (bcli, rcli, scli):  # no command checks on its own any more
        assert "check_foreign_file" not in open(mod.__file__).read(), mod.__name__
