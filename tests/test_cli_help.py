"""Help text written for a person (issues 23 and 29): every option of every command has a real help line, defaults
are shown as values (never Python source or RST), and the shared options exist and mean the same everywhere."""

from __future__ import annotations

import re

import click
import pytest
import typer.main

from attnlab.cli import app

_STOP = {"a", "an", "the", "of", "per", "to", "in", "for", "and", "or", "n", "num", "number", "is", "be", "at", "on"}
# Python source that must never be shown as a default, and markup that must never reach --help
_SOURCE = [re.compile(p) for p in (r"\b(list|tuple|dict|field|lambda|sorted)\b", r"\b[A-Z][A-Z0-9]+_[A-Z0-9_]+\b",
                                    r"\d\s+/\s+\d", r"\bNone\b", r"\.[A-Z]{3,}", r"^required$", r"^[(\[]", r"^'", r'^"', r"^True$",
                                    r"^False$")]
_MARKUP = [re.compile(p) for p in (r"``", r":func:", r":class:", r":mod:", r"\[default: required\]\s*\[required\]")]

# Shared options (same name, same meaning) and the commands that must have each.
SHARED = {
    "quiet": {"capture", "spectrum", "views", "demo", "reconstruct run", "reconstruct train", "reconstruct fit",
              "sparsity train", "sparsity run", "sparsity prefill", "lm train", "variables sweep", "variables train"},
    "out": {"capture", "spectrum", "views", "demo", "reconstruct run", "reconstruct train", "reconstruct fit",
            "sparsity train", "sparsity run", "sparsity prefill", "lm train", "variables sweep"},
    "resume": {"spectrum", "reconstruct run", "reconstruct train", "sparsity train", "sparsity run", "lm train",
               "variables sweep"},
    "device": {"capture", "spectrum", "views", "reconstruct run", "reconstruct train", "reconstruct fit",
               "sparsity train", "sparsity run", "sparsity prefill", "lm train", "variables sweep", "variables train"},
    "seed": {"capture", "spectrum", "reconstruct run", "reconstruct train", "reconstruct fit", "sparsity train",
             "sparsity run", "sparsity prefill", "lm train", "variables sweep", "variables train"},
}


def _commands(cmd=None, path=()):
    cmd = cmd or typer.main.get_command(app)
    subs = getattr(cmd, "commands", None)
    if subs is None:
        yield " ".join(path), cmd
        return
    for name, sub in sorted(subs.items()):
        yield from _commands(sub, (*path, name))


COMMANDS = dict(_commands())


def _help(cmd: click.Command, p: click.Parameter) -> str:
    rec = p.get_help_record(click.Context(cmd))
    return rec[1] if rec else (getattr(p, "help", None) or "")


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def filler(name: str, text: str) -> str | None:
    """Why ``text`` is not a help line for option ``name`` (None when it is one)."""
    body = re.sub(r"\s*\[(default|required)[^\]]*\]", "", text).strip()
    words = _words(body)
    if len(words) < 3:
        return f"too short: {body!r}"
    if set(words) <= set(_words(name.replace("_", " "))) | _STOP:
        return f"restates the name: {body!r}"
    for pat in _MARKUP:
        if pat.search(text):
            return f"markup {pat.pattern!r} in {text!r}"
    for default in re.findall(r"\[default: (.*?)\](?:\s|$)", text):
        for pat in _SOURCE:
            if pat.search(default):
                return f"Python source {pat.pattern!r} as the default in {text!r}"
    return None


def test_the_walk_sees_every_command():
    assert {"spectrum", "reconstruct run", "sparsity prefill", "variables sweep", "lm train", "views"} <= set(COMMANDS)


@pytest.mark.parametrize("path", sorted(COMMANDS))
def test_every_option_has_a_help_line(path):
    cmd = COMMANDS[path]
    bad = {}
    for p in cmd.params:
        if p.name == "help":
            continue
        why = filler(p.name, _help(cmd, p))
        if why:
            bad[p.name] = why
    assert not bad, f"attnlab {path}: {bad}"


@pytest.mark.parametrize("name", sorted(SHARED))
def test_shared_options_exist_and_mean_the_same(name):
    missing = [c for c in sorted(SHARED[name]) if name not in {p.name for p in COMMANDS[c].params}]
    assert not missing, f"--{name} missing from: {missing}"
    params = [(c, next(p for p in COMMANDS[c].params if p.name == name)) for c in SHARED[name]]
    for c, p in params:
        assert f"--{name}" in p.opts, (c, p.opts)
        text = _help(COMMANDS[c], p).lower()
        if name in ("quiet", "resume"):
            assert p.is_flag or p.secondary_opts, (c, name)
        if name == "device":
            assert "cpu" in text and "cuda" in text, (c, text)
        if name == "seed":
            assert "seed" in text, (c, text)
    if name == "quiet":  # one meaning: the same sentence everywhere
        texts = {_help(COMMANDS[c], p) for c, p in params}
        assert len(texts) == 1, texts


def test_variables_options_come_from_their_dataclasses():
    """`variables sweep` / `train` follow the one convention: an option per field of their options dataclass, plus
    the shared options (no hand-written option restating a default)."""
    from attnlab.cli_config import config_fields

    for path, target, shared in (("variables sweep", "SweepOptions", {"out", "resume", "quiet"}),
                                 ("variables train", "TrainOptions", {"quiet"})):
        fields = {f.name for f in config_fields(f"attnlab.variables.config:{target}")}
        assert {p.name for p in COMMANDS[path].params} - {"help"} == fields | shared, path
    flags = {o for p in COMMANDS["variables sweep"].params for o in p.opts}
    assert {"--T", "--contrast-max-T", "--norm-T", "--probe-T", "--probe-m", "--s"} <= flags


def test_filler_is_caught():
    """The checker fails on the help lines the issue quoted (a check that cannot fail is a defect)."""
    for name, text in [("d_ff", "D ff. [default: 1536]"), ("batch_size", "Batch size."), ("device", "Device."),
                       ("long_seq_len", "Long seq len. [default: 65536]"),
                       ("estimators", "Estimators to run. [default: list(DEFAULT_ESTIMATORS)]"),
                       ("frontier_budgets", "Pair fractions of the frontier. [default: [1 / 32, 1 / 16]]"),
                       ("model", "Causal model folder or hub id. [default: required]  [required]"),
                       ("estimators", "Several estimators (overrides ``estimator``).")]:
        assert filler(name, text), text
    assert filler("seq_len", "Tokens per window. [default: 128]") is None


def test_lm_train_help_names_both_presets():
    """`lm train --help` does not present the gpu preset's values as the defaults under --preset tiny."""
    cmd = COMMANDS["lm train"]
    text = _help(cmd, next(p for p in cmd.params if p.name == "d_model"))
    assert "gpu" in text and "tiny" in text, text


def test_defaults_are_values():
    cmd = COMMANDS["reconstruct run"]
    by = {p.name: _help(cmd, p) for p in cmd.params}
    assert "[default: gaussian, basis, proxy+gaussian]" in by["estimators"]
    assert "[default: 0.03125, 0.0625, 0.125, 0.25, 0.5]" in by["frontier_budgets"]
    assert "[default: minilm]" in by["model"]


def test_reconstruct_resume_keeps_a_finished_section(tmp_path, monkeypatch):
    """`reconstruct run --resume` recomputes nothing when --out holds a section with the same settings."""
    import json
    from dataclasses import asdict

    import attnlab.reconstruct.run as rr
    from attnlab.cli import run_cli
    from attnlab.io import RunDir

    calls = []
    cfg = rr.ReconstructConfig(model="minilm", seq_len=64)
    done = {"config": json.loads(json.dumps(asdict(cfg))), "table": {}, "best": "x", "best_chosen_at": "pair budget 16",
            "best_worst_layer_tv": 0.1, "best_compute": 0.5}
    monkeypatch.setattr(rr, "reconstruct", lambda out, progress=True, **kw: calls.append(kw) or done)
    monkeypatch.setattr(rr, "format_table", lambda t: "table")
    RunDir(tmp_path).write_section(rr.SECTION, done)
    monkeypatch.setattr("attnlab.cli_utils.write_report", lambda out: None)
    monkeypatch.setattr("attnlab.reconstruct.cli.write_report", lambda out: None)
    for argv, n in ((["--resume"], 0), (["--resume", "--n-eval", "32"], 1)):
        try:
            run_cli(["reconstruct", "run", "--seq-len", "64", "--out", str(tmp_path), *argv])
        except SystemExit as e:
            assert e.code in (0, None)
        assert len(calls) == n, argv  # same settings: kept; other settings: run again


def test_numbers_are_rounded_and_one_seed_has_no_interval():
    from attnlab.reconstruct.train import format_summary
    from attnlab.textfmt import NO_INTERVAL, interval, num

    assert interval([-31.216380043874913, 45.158180663281264]) == "[-31.2, 45.2]"
    assert interval([21, 21], n=1) == NO_INTERVAL and interval([21.0, 21.0]) == NO_INTERVAL
    assert "inf" not in interval([float("-inf"), float("inf")])
    assert num(0.919812345) == "0.92" and num(21.0) == "21"
    one = {"objective": "clm", "label": "full", "budget": 1.0, "compute": 1.0, "gap_to_full": None,
           "heldout_loss": {"mean": 2.5, "std": 0.0, "n": 1}}
    text = format_summary([one])
    assert "± 0.0000" not in text and NO_INTERVAL in text
    two = {**one, "heldout_loss": {"mean": 2.5, "std": 0.01, "n": 2}}
    assert "± 0.0100" in format_summary([two]) and NO_INTERVAL not in format_summary([two])


def test_other_torchrun_ranks_print_nothing(monkeypatch):
    """Under torchrun every result line is printed once (rank 0); other ranks are silent on stdout."""
    import logging

    from typer.testing import CliRunner

    from attnlab.cli_utils import HardenedGroup

    demo_app = typer.Typer(cls=HardenedGroup)

    @demo_app.command()
    def hello() -> None:
        typer.echo("result line")

    @demo_app.command()
    def other() -> None:
        pass

    level = logging.getLogger("attnlab").level
    try:
        for rank, shown in (("1", False), ("0", True)):
            monkeypatch.setenv("RANK", rank)
            res = CliRunner().invoke(demo_app, ["hello"])
            assert res.exit_code == 0 and ("result line" in res.stdout) == shown, (rank, res.stdout)
    finally:
        logging.getLogger("attnlab").setLevel(level)


def test_report_cells_flatten_nested_lists():
    from attnlab.report.html import cell

    assert cell([[0.919812]]) == "0.9198" and cell([0.1234567, 2]) == "0.1235, 2"


def test_prefill_out_dir_is_a_run_directory_with_a_speed_section(tiny_lm, tmp_path):
    """`sparsity prefill --out DIR`: DIR/prefill.json plus DIR's speed section (what `attnlab report DIR` shows)."""
    from typer.testing import CliRunner

    from attnlab.io import RunDir

    out = tmp_path / "run"
    r = CliRunner().invoke(app, ["sparsity", "prefill", "--model", tiny_lm, "--seq-len", "64", "--block-size", "16",
                                 "--predictor", "oracle", "--windows", "1", "--reps", "1", "--rows", "16", "--device",
                                 "cpu", "--quiet", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert (out / "prefill.json").is_file() and RunDir(out, create=False).section("speed")["sources"]
