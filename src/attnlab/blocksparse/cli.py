"""CLI wiring of block-sparse execution: ``attnlab sparsity prefill`` (registered onto the sparsity command group
by the top-level CLI, so that :mod:`attnlab.sparsity` never imports this package)."""

from __future__ import annotations

from typing import Optional

import typer

from ..cli_config import config_command, option, quiet_option
from ..cli_utils import out_files

__all__ = ["register"]


@out_files(".json", inside="prefill.json")
def _prefill(settings: dict, out: Optional[str], quiet: bool = False) -> None:
    """Real forward of a causal model with every attention layer replaced by predicted block-sparse attention:
    per-head density, measured recall and output error; loss change and speed vs SDPA flash / cuDNN."""
    from ..distributed import is_main_process
    from .prefill import PrefillConfig, format_summary, run_prefill

    res = run_prefill(PrefillConfig(**settings), log=None if quiet else typer.echo)
    if not is_main_process():  # torchrun: rank 0 prints and writes
        return
    typer.echo(format_summary(res))
    if out:
        _write(out, res)


def _write(out: str, res: dict) -> None:
    """``--out FILE.json``: the result as JSON; ``--out DIR``: DIR/prefill.json, imported as DIR's speed section.
    The ``attnlab_output`` mark lets a re-run replace the file (files without it are refused)."""
    from pathlib import Path

    from ..io import OUTPUT_MARK, write_json

    res = {OUTPUT_MARK: "sparsity prefill", **res}
    if Path(out).suffix == ".json":
        write_json(out, res)
        typer.echo(f"wrote {out}")
        return
    from ..report.speed import import_speed

    path = Path(out) / "prefill.json"
    write_json(path, res)
    import_speed(out, [path])
    typer.echo(f"wrote {path} (speed section of {out}; render with `attnlab report {out}`)")


def register(app: typer.Typer) -> None:
    """Add the ``prefill`` command to ``app`` (the ``attnlab sparsity`` group)."""
    config_command(app, "prefill", "attnlab.blocksparse.prefill.config:PrefillConfig", _prefill,
                   help_extra={"model": "Causal HF model folder or cached hub id (e.g. a folder from 'attnlab lm train')",
                               "seq_len": "Tokens per held-out window (padded inside attention to a multiple of "
                                          "--block-size)",
                               "predictor": "Block predictor name from the block-predictor registry (e.g. pooled, oracle, "
                                            "minference; 'full' keeps every tile)",
                               "recall": "Mass-recall target p per head", "block_size": "Tile size of the block pattern",
                               "windows": "Held-out windows (spread across windows is reported)",
                               "rows": "Sampled query rows per layer for exact recall and output error",
                               "reps": "Timed forwards per window and mode",
                               "fallback": "Run heads above the kernel's measured break-even density dense",
                               "device": "auto (cuda if available) | cpu | cuda", "seed": "Seed of the window choice",
                               "calibration": "online (calibrate every call) | offline (per-head knobs fitted once "
                                              "on training-split windows, stored next to the model, checked on "
                                              "held-out rows)",
                               "knobs": "Knob file or folder for --calibration offline (default: the model folder)",
                               "fit_windows": "Training-split windows the offline knobs are fitted on",
                               "check_rows": "Held-out rows per layer for the run-time recall check (offline)",
                               "head_policy": "layer (a layer runs dense when its mean density is above the "
                                              "break-even) | head (per head)",
                               "kernel": "default | tuned (measured FlexAttention kernel_options for the head dim)",
                               "remainder": "none | a method of attnlab.blocksparse.remainder that adds the "
                                            "skipped tiles' estimated contribution"},
                   extra=[option("out", Optional[str], None, "--out", help="Run directory for the full result (per "
                                 "layer/head) as prefill.json and a report speed section; a path ending in .json names "
                                 "the file itself. [default: print only]"),
                          quiet_option()])
