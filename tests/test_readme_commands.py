"""The README's command lines run as written (issue 29 item 4).

Every line of a fenced block that starts with ``attnlab `` (or ``torchrun ... -m attnlab``) is extracted. The fast
tests parse each one against the real command (options exist, values convert, required ones given). The slow test
runs each at tiny sizes: the README's flags stay, only the size flags in :data:`TINY` are replaced.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import click
import pytest
import typer.main

from attnlab.cli import app

README = Path(__file__).resolve().parents[1] / "README.md"
PLACEHOLDERS = ("RUN_A", "RUN_B", "RUN_C", "RUN")  # longest first


def readme_commands(text: str | None = None) -> list[list[str]]:
    """The argv (after ``attnlab``) of every command line in the README's fenced blocks, comments stripped."""
    text = README.read_text() if text is None else text
    out = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip()
            m = re.match(r"(?:torchrun .*?-m )?attnlab (.*)", line)
            if not m:
                continue
            argv = shlex.split(m.group(1), comments=True)
            argv = [a for a in argv if not (a.startswith("[") or a.endswith("]") or a == "...")]  # [optional ...]
            out.append(argv)
    return out


def _command(argv: list[str]) -> tuple[str, click.Command, list[str]]:
    cmd, path, rest = typer.main.get_command(app), [], list(argv)
    while getattr(cmd, "commands", None) is not None and rest and rest[0] in cmd.commands:
        path.append(rest[0])
        cmd = cmd.commands[rest.pop(0)]
    return " ".join(path), cmd, rest


COMMANDS = readme_commands()


def test_readme_has_command_lines():
    names = {_command(a)[0] for a in COMMANDS}
    assert {"demo", "spectrum", "reconstruct run", "sparsity run", "sparsity prefill", "report"} <= names, names


def test_extraction_strips_comments_and_optional_parts():
    got = readme_commands("```\nattnlab report   RUN [prefill.json ...]   # render\nattnlab views --text \"a # b\" "
                          "--out RUN  # note\n```\n```bash\ntorchrun --nproc-per-node 2 -m attnlab spectrum \\\n"
                          "    --out runs/big\n```\nattnlab outside a block\n")
    assert got == [["report", "RUN"], ["views", "--text", "a # b", "--out", "RUN"], ["spectrum", "--out", "runs/big"]]


@pytest.mark.parametrize("argv", COMMANDS, ids=[" ".join(a)[:60] for a in COMMANDS])
def test_readme_command_parses(argv):
    """Each README line names a real command whose options exist and whose values convert (nothing runs)."""
    name, cmd, rest = _command(argv)
    assert getattr(cmd, "commands", None) is None, f"`attnlab {' '.join(argv)}` does not name a command"
    ctx = cmd.make_context(name or "attnlab", rest, resilient_parsing=False)
    assert ctx.params is not None
    assert cmd.make_context(name, ["--help"], resilient_parsing=True) is not None


# Size flags replaced for the slow run (the README's other flags stay as written). A list value replaces every value
# the README gave that flag.
TINY: dict[str, dict[str, list[str]]] = {
    "demo": {"--quick": [], "--pillars": ["spectrum"]},
    "spectrum": {"--n-sequences": ["4"], "--seq-len": ["32"], "--layers": ["0-1"], "--batch-size": ["4"],
                 "--no-report": []},
    "capture": {"--n-sequences": ["2"], "--seq-len": ["32"]},
    "reconstruct run": {"--seq-len": ["32"], "--n-fit": ["8"], "--n-eval": ["4"], "--layers": ["0"],
                        "--budgets": ["0.5"], "--frontier-ranks": ["2"], "--frontier-budgets": ["0.25,0.5"],
                        "--extra-ranks": ["2"]},
    "reconstruct train": {"--steps": ["4"], "--seq-len": ["16"], "--max-chars": ["20000"], "--eval-windows": ["4"],
                          "--refit-windows": ["8"], "--refresh": ["2"], "--log-every": ["2"], "--d-model": ["16"],
                          "--n-heads": ["2"], "--n-layers": ["1"], "--batch-size": ["4"], "--budgets": ["0.5"]},
    "sparsity run": {"--hf-seq-len": ["32"], "--hf-finetune-steps": ["2"], "--n-fit": ["8"], "--n-eval": ["4"],
                     "--n-down": ["4"], "--epochs": ["1"], "--methods": ["window,oracle-topk"]},
    "sparsity train": {"--steps": ["2"], "--max-windows": ["32"], "--batch-size": ["4"], "--n-layers": ["1"],
                       "--seq-len": ["32"]},
    "lm train": {"--preset": ["tiny"], "--steps": ["2"]},
    "sparsity prefill": {"--seq-len": ["256"], "--windows": ["1"], "--rows": ["16"], "--reps": ["1"],
                         "--device": ["cpu"], "--block-size": ["64"]},
    "variables sweep": {"--T": ["4", "8"], "--s": ["2"], "--seeds": ["1"], "--m-max": ["32"], "--max-steps": ["20"],
                        "--n-test": ["64"], "--contrast": ["none"], "--no-probe": []},
}
NEEDS_GPU = ("--device cuda",)


def tiny(argv: list[str]) -> list[str]:
    """``argv`` with the flags of :data:`TINY` replaced (all the README's values of such a flag go)."""
    name, _, _ = _command(argv)
    over = TINY.get(name, {})
    out, skip = [], False
    for a in argv:
        if a.startswith("--"):
            skip = a in over
        if not skip:
            out.append(a)
    for flag, values in over.items():
        out += [flag, *values]
    return out


def _placeholders(argv: list[str], tmp: Path) -> list[str]:
    out = []
    for a in argv:
        for p in PLACEHOLDERS:
            a = a.replace(p, str(tmp / p.lower()))
        out.append(a)
    return out


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """One directory for all README lines (later lines use earlier outputs: RUN, runs/lm), README.md inside it so
    that `--corpus README.md` reads as from the repo root."""
    d = tmp_path_factory.mktemp("readme")
    (d / "README.md").write_text(README.read_text())
    return d


@pytest.mark.slow
@pytest.mark.parametrize("argv", COMMANDS, ids=[" ".join(a)[:60] for a in COMMANDS])
def test_readme_command_runs(argv, workdir, monkeypatch, capsys):
    """Each README command line (GPU-only lines excepted) finishes with exit code 0 at tiny sizes. The lines run in
    README order and share one directory; run the whole test, not a single line."""
    from attnlab.cli import invoke

    line = " ".join(argv)
    if any(g in line for g in NEEDS_GPU):
        pytest.skip("GPU-only line")
    monkeypatch.chdir(workdir)
    monkeypatch.setenv("ATTNLAB_CACHE", str(workdir / "cache"))
    if _command(argv)[0] == "compare":  # two spectrum runs: the README's RUN twice
        argv = [a if not a.startswith("RUN_") or a == "RUN_C" else "RUN" for a in argv]
    args = _placeholders(tiny(argv), workdir)
    code = invoke(args)
    err = capsys.readouterr().err
    assert code == 0, (args, err[-1500:])
