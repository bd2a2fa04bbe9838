"""CLI options generated from config dataclasses (issue 12): every field reachable, one source of defaults."""

from __future__ import annotations

import dataclasses

import click
import pytest
import typer.main

from attnlab.cli import app, run_cli
from attnlab.cli_config import config_fields


def _params(*path: str) -> dict[str, click.Parameter]:
    cmd = typer.main.get_command(app)
    for p in path:
        cmd = cmd.commands[p]
    return {p.name: p for p in cmd.params}


@pytest.mark.parametrize("path,cls,skip", [
    (("spectrum",), "attnlab.spectral.run:SpectrumConfig", ()),
    (("reconstruct", "run"), "attnlab.reconstruct.config:ReconstructConfig", ()),
    (("reconstruct", "train"), "attnlab.reconstruct.train:TrainConfig", ()),
    (("sparsity", "train"), "attnlab.sparsity.train_entmax:EntmaxTrainConfig", ()),
    (("sparsity", "run"), "attnlab.sparsity.train_entmax:EntmaxTrainConfig", ()),
    (("sparsity", "prefill"), "attnlab.blocksparse.prefill.config:PrefillConfig", ()),
    (("lm", "train"), "attnlab.lm.train:LMConfig", ()),
])
def test_every_config_field_is_an_option(path, cls, skip):
    import importlib

    module, name = cls.split(":")
    real = {f.name for f in dataclasses.fields(getattr(importlib.import_module(module), name))}
    assert {f.name for f in config_fields(cls)} == real  # the source reader sees every field
    params = _params(*path)
    assert real - set(skip) <= set(params), real - set(params)
    assert "out" in params


def test_config_values_reach_the_run(tmp_path, monkeypatch):
    """Flags and TOML keys (including fields the hand-written CLI could not reach) arrive parsed."""
    import attnlab.reconstruct.run as rr

    seen = {}

    def fake(out, progress=True, **settings):
        seen.update(settings, out=out)
        return {"table": {}, "best": "x", "best_worst_layer_tv": 0.0, "best_chosen_at": "pair budget 32",
                "best_compute": 0.5}

    monkeypatch.setattr(rr, "reconstruct", fake)
    monkeypatch.setattr(rr, "format_table", lambda t: "")
    f = tmp_path / "c.toml"
    f.write_text('[reconstruct.run]\nextra-ranks = [2, 16]\nheads = [0, 1]\ntopk = 3\npooled-baseline = false\n')
    try:
        run_cli(["reconstruct", "run", "--config", str(f), "--budget", "32", "--budgets", "0.25,8", "--budgets", "0.5",
                 "--layers", "0-2", "--topk", "7", "--out", str(tmp_path / "o")])
    except SystemExit as e:
        assert e.code in (0, None)
    assert seen["extra_ranks"] == [2, 16] and seen["heads"] == [0, 1] and seen["pooled_baseline"] is False
    assert seen["budget"] == 32 and isinstance(seen["budget"], int) and seen["budgets"] == [0.25, 8, 0.5]
    assert seen["layers"] == [0, 1, 2] and seen["topk"] == 7 and seen["out"] == str(tmp_path / "o")
    assert "seq_len" not in seen  # not given: the dataclass default applies


def test_help_shows_the_dataclass_default_and_comment():
    help_text = _params("spectrum")["head_chunk"].help
    assert help_text == "Heads scored at once (bounds peak memory). [default: 4]"  # the field's comment + default (plain help)
