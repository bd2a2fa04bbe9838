"""`attnlab reconstruct ...`: fit + evaluate + drop-in (run), training comparison (train), fit only (fit)."""

from __future__ import annotations

from typing import Optional

import typer

from ..cli_config import QUIET_HELP, config_command, option, out_option, quiet_option, resume_option
from ..cli_utils import HardenedGroup, out_files, write_report

app = typer.Typer(cls=HardenedGroup,
                  help="Reconstruct attention scores from a subset of computed pairs (eigen-analysis paper).",
                  no_args_is_help=True)


def _finished(out: str, settings: dict) -> Optional[dict]:
    """The 'reconstruct' section of ``out`` when it was written with exactly these settings (--resume), else None."""
    import json
    from dataclasses import asdict
    from pathlib import Path

    from ..io import RunDir
    from .run import SECTION, ReconstructConfig

    if not (Path(out) / "results.json").is_file():
        return None
    prev = RunDir(out, create=False).section(SECTION) or {}
    cfg = ReconstructConfig(**{"model": "minilm", **settings})
    same = json.loads(json.dumps(asdict(cfg), default=str)) == prev.get("config")
    return prev if same and "table" in prev else None


def _run(settings: dict, out: str, quiet: bool, resume: bool, all_methods: bool = False) -> None:
    """Fit on the fit split, evaluate every estimator x selection on held-out text, sweep budgets, drop-in."""
    from .estimators import ALL_ESTIMATORS
    from .run import format_table, reconstruct
    from .selection import STRATEGIES

    if all_methods:
        settings = {**settings, "estimators": list(ALL_ESTIMATORS), "selections": list(STRATEGIES)}
    res = _finished(out, settings) if resume else None
    if res is not None:
        typer.echo(f"{out}: reconstruct already finished with these settings (--resume); nothing recomputed")
    else:
        res = reconstruct(out, progress=not quiet, **settings)
    from ..distributed import is_main_process

    if not is_main_process():  # torchrun: rank 0 reports
        return
    from ..report.summary import methods_text

    typer.echo(format_table(res["table"]))
    typer.echo(f"{methods_text(res)}; best {res['best']} (chosen at {res['best_chosen_at']}): worst-layer TV {res['best_worst_layer_tv']:.4f} "
               f"(target 0.05) at total compute {res['best_compute']:.3f}; results in {out}")
    write_report(out)


def _registry_help(module: str) -> str:
    """'name: help; ...' of every registered estimator or selection (read when --help is shown: imports torch)."""
    from importlib import import_module

    reg = (import_module(f"{__package__}.estimators").ESTIMATOR_REGISTRY if module == "estimators"
           else import_module(f"{__package__}.selection").SELECTIONS)
    return "; ".join(f"{n}: {reg.entry(n).help}" if reg.entry(n).help else n for n in reg.names())


_run._attnlab_resume_interrupted = False  # --resume keeps a finished section; an interrupted run starts over

config_command(app, "run", "attnlab.reconstruct.config:ReconstructConfig", _run,
               extra=[out_option("runs/reconstruct", "Run directory (results.json section 'reconstruct', PNGs)"),
                      quiet_option(),
                      option("resume", bool, False, "--resume/--no-resume",
                             help="Keep a finished 'reconstruct' section of --out written with the same settings "
                                  "(nothing recomputed); otherwise run from the start."),
                      option("all_methods", bool, False, "--all",
                             help="Evaluate every estimator x selection (overrides --estimators/--selections).")],
               kinds={"budget": "number", "layers": "ints", "heads": "ints"},
               help_extra={"budget": "Exact pairs per row: a fraction in (0, 1] (0.25) or a count (32)",
                           "budgets": "Budgets of the sweep (comma list; empty = no sweep)",
                           "estimators": "Estimators (comma list; --all for every one)",
                           "selections": "Selection strategies (comma list; --all for every one)",
                           "layers": "Layers, e.g. '0,2-4' (None: all)", "heads": "Heads, e.g. '0-3' (None: all)",
                           "corpus": "Text file, directory of .txt/.md/.jsonl files, or .jsonl file (None: Python "
                                     "stdlib docstrings)",
                           "k": "Basis size of the basis estimator (None: min(k90 of the head, budget))",
                           "batch_size": "Windows per forward pass (bounds peak memory)",
                           "families": "Frontier method families (None: all)",
                           "frontier_budgets": "Pair fractions (exact pairs per row / keys) of the frontier",
                           "seed": "Random seed of the window choice and the random selections (same seed, same "
                                   "numbers)"},
               late_help={"estimators": lambda: _registry_help("estimators"),
                          "selections": lambda: _registry_help("selection")})


@app.command()
@out_files(".safetensors", inside="reconstruct_fit.safetensors")  # = fit.FIT_FILE
def fit(
    model: str = typer.Option("minilm", help="HF hub id (cached), local folder, or 'minilm' (packaged "
                                             "all-MiniLM-L6-v2)."),
    out: str = typer.Option("runs/reconstruct", help="Run directory to write reconstruct_fit.safetensors into (a path "
                                                     "ending in .safetensors names the file itself)."),
    seq_len: int = typer.Option(128, help="Tokens per window."),
    n_fit: int = typer.Option(256, help="Windows of the fit split (never the held-out documents)."),
    corpus: Optional[str] = typer.Option(None, help="Text file, directory or .jsonl file. [default: Python stdlib "
                                                    "docstrings]"),
    batch_size: int = typer.Option(8, help="Windows per forward pass (bounds peak memory)."),
    device: str = typer.Option("cpu", help="Where the model runs: cpu, cuda or cuda:N."),
    seed: int = typer.Option(0, help="Random seed of the window choice (same seed, same numbers)."),
    quiet: bool = typer.Option(False, "--quiet", help=QUIET_HELP),
) -> None:
    """Fit and save the statistics only (reuse with `run --fit-path`)."""
    from pathlib import Path

    from .fit import FIT_FILE, fit_corpus, load_checked

    # (a foreign file at the path was refused with the --out lock: io.lock_output)
    path = Path(out) if Path(out).suffix == ".safetensors" else Path(out) / FIT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    hf = load_checked(model, seq_len, device=device)
    f = fit_corpus(hf, n_fit, seq_len, corpus=corpus, batch_size=batch_size, seed=seed, progress=not quiet)
    f.meta["model"] = model
    f.save(path)
    typer.echo(f"saved {path} (reuse with `attnlab reconstruct run --fit-path {path}`)")


@app.command("long")
def long_cmd(
    model: str = typer.Option(..., help="A causal LM: local folder (e.g. runs/lm/gpu) or cached hub id."),
    lengths: str = typer.Option("2048,8192,32768", help="Window lengths (comma list)."),
    out: str = typer.Option("runs/reconstruct_long", help="Run directory (results.json section 'reconstruct_long')."),
    n_fit: int = typer.Option(2, help="Fit windows (proxy moments, spectrum rows)."),
    n_eval: int = typer.Option(4, help="Held-out windows (the spread is across them; >= 2)."),
    eval_rows: int = typer.Option(1024, help="Held-out query rows per window."),
    spectrum_rows: int = typer.Option(2048, help="Fit rows sampled for the row spectrum."),
    chunk_rows: int = typer.Option(256, help="Query rows per chunk (memory: 8 * n_eval * chunk * N floats per head)."),
    device: str = typer.Option("cpu", help="cpu, cuda or cuda:N."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress output."),
) -> None:
    """Long-context reconstruction on a causal LM, one chunk of rows at a time: row spectrum and compute frontier."""
    from ..cli_utils import parse_int_list
    from .long_run import run_long

    run_long(out, model, parse_int_list(lengths, "--lengths"), log=(lambda s: None) if quiet else typer.echo,
             n_fit=n_fit, n_eval=n_eval, eval_rows=eval_rows, spectrum_rows=spectrum_rows, chunk_rows=chunk_rows,
             device=device)
    typer.echo(f"results in {out}")


def _train(settings: dict, out: str, quiet: bool, resume: bool = False) -> None:
    """Train our small transformer (char LM) with reconstructed attention vs full attention; saves the curve."""
    from .run import train as run_train

    res = run_train(out, progress=not quiet, resume=resume, **settings)
    from .train import format_summary

    typer.echo(format_summary(res["summary"]))
    write_report(out)


config_command(app, "train", "attnlab.reconstruct.train:TrainConfig", _train,
               extra=[out_option("runs/reconstruct", "Run directory (stored under reconstruct.train)"), quiet_option(),
                      resume_option()],
               help_extra={"budgets": "Budgets (fractions or counts, comma list)",
                           "selections": "Selection strategies compared (comma list)",
                           "estimators": "Several estimators compared (overrides --estimator; None: --estimator only)",
                           "d_model": "Model width (hidden size)", "n_layers": "Number of transformer blocks",
                           "objectives": "Training objectives: clm (next byte, causal) and/or mlm (masked byte)",
                           "device": "Where training runs: cpu, cuda or cuda:N",
                           "mask_rate": "Share of positions masked (mlm objective)",
                           "eval_every": "Steps between held-out curve points (0: every --log-every steps)",
                           "seed": "Base seed of the held-out choice (--seeds seed the runs)"})
