"""`attnlab` command line. Heavy imports happen inside commands so that `--help` is instant.

Precedence of settings, for every command: CLI flags > `--config file.toml` > defaults. The file's
`[spectrum]`, `[reconstruct.run]`, `[variables.sweep]`, ... tables hold option names (dashes or underscores);
they become the command's defaults (click's default_map), so flags given on the command line still win.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Optional

import typer

from .cli_config import QUIET_HELP, config_command, option, out_option, quiet_option, resume_option
from .cli_utils import HardenedGroup, parse_int_list  # noqa: F401  (re-exported: attnlab.cli.parse_int_list)

app = typer.Typer(
    cls=HardenedGroup, name="attnlab", no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
    # Plain help text: Rich markup would swallow "[default: ...]" and "[spectrum]" as style tags.
    rich_markup_mode=None,
    help="Measure, predict and exploit the structure of self-attention in transformer models.\n\n"
         "Start with `attnlab demo`; every command writes a run directory (results.json, *.safetensors, "
         "*.png) that `attnlab report RUN_DIR` renders into one self-contained report.html.\n\n"
         "Every command also takes --config FILE.toml: its [command] table (e.g. [spectrum], [reconstruct.run]) "
         "sets defaults; flags on the command line win.",
)

def _version(value: bool) -> None:
    if value:
        from . import __version__

        typer.echo(f"attnlab {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the attnlab version and exit."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Also show debug messages of the library."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Show warnings and errors only."),
) -> None:
    """Measure, predict and exploit the structure of self-attention in transformer models."""
    from .logs import setup_cli_logging

    setup_cli_logging("DEBUG" if verbose else "WARNING" if quiet else "INFO")


ModelOpt = typer.Option(None, "--model", help="HF hub id (already cached), local model folder, or 'minilm' "
                                              "(packaged all-MiniLM-L6-v2). [default: minilm]")
CorpusOpt = typer.Option(None, "--corpus", help="Text file, directory of .txt/.md/.jsonl files, or .jsonl file. "
                                                "[default: Python stdlib docstrings]")
LayersOpt = typer.Option(None, "--layers", help="Layers to draw, e.g. '0,2-4'. [default: all]")
HeadsOpt = typer.Option(None, "--heads", help="Heads to draw, e.g. '0-3,7'; the figures name the subset. "
                                              "[default: all]")
DeviceOpt = typer.Option(None, "--device", help="Where the model runs: cpu, cuda or cuda:N. [default: cpu]")
SeedOpt = typer.Option(None, "--seed", help="Random seed (same seed, same numbers). [default: 0]")


def _capture(settings: dict[str, Any], out: str, quiet: bool) -> None:
    """Save raw pre-softmax scores (scaled, masked as the model does) of a few windows to safetensors.

    Example: attnlab capture --out runs/cap --n-sequences 4 --layers 0,5 --with-qk
    """
    from .capture.dump import capture as run_capture

    meta = run_capture(out, progress=not quiet, **settings)
    typer.echo(f"captured {meta['n_sequences']} x {len(meta['layers'])} layers x {len(meta['heads'])} heads -> "
               f"{Path(out) / 'capture.safetensors'}")
    _render(Path(out))


_MODEL_HELP = {"model": "HF hub id (already cached), local model folder, or 'minilm' (packaged all-MiniLM-L6-v2)",
               "corpus": "Text file, directory of .txt/.md/.jsonl files, or .jsonl file (None: Python stdlib "
                         "docstrings)",
               "layers": "Layers to analyse, e.g. '0,2-4' (None: all)",
               "heads": "Heads to analyse, e.g. '0-3,7' (None: all)",
               "batch_size": "Windows per forward pass (bounds peak memory)",
               "device": "Where the model runs: cpu, cuda or cuda:N"}

config_command(app, "capture", "attnlab.capture.dump:capture", _capture, skip=("out", "progress"),
               kinds={"layers": "ints", "heads": "ints", "model": "str"},
               help_extra={**_MODEL_HELP, "seq_len": "Tokens per window", "n_sequences": "Windows to capture",
                           "batch_size": "Windows per forward pass", "with_qk": "Also save queries and keys",
                           "split": "fit | heldout | all documents",
                           "seed": "Random seed (same seed, same numbers)",
                           "text_field": "JSON-lines field holding the text"},
               extra=[out_option("runs/capture", "Run directory to write capture.safetensors into"), quiet_option()])


def _spectrum(settings: dict[str, Any], out: str, resume: bool, report: bool, quiet: bool) -> None:
    """Eigen analysis of attention scores: explained variance, k for 90/95/99%, eigenspace overlaps.

    Works under `torchrun --nproc-per-node K attnlab spectrum ...` (statistics merged by all-reduce).
    Example: attnlab spectrum --out runs/minilm --n-sequences 512 --seq-len 128
    """
    from .spectral.run import spectrum as run_spectrum

    name = settings.pop("model", "minilm")
    res = run_spectrum(out, model=name, resume=resume, progress=not quiet, **settings)
    from .spectral.spread import spread_line

    typer.echo(f"pooled rank for 90/95/99% of row variance: {res['pooled']['k90']}/{res['pooled']['k95']}/"
               f"{res['pooled']['k99']} of {res['seq_len']}")
    typer.echo(spread_line(res))
    if report:
        _render(Path(out))


config_command(app, "spectrum", "attnlab.spectral.run:SpectrumConfig", _spectrum,
               extra=[out_option("runs/spectrum", "Run directory (created; results.json, spectrum.safetensors, plots)"),
                      resume_option(),
                      option("report", bool, True, "--report/--no-report", help="Render report.html at the end."),
                      quiet_option()],
               help_extra={**_MODEL_HELP, "n_sequences": "Windows of the corpus analysed (more windows: steadier k90)",
                           "basis_k": "Basis size of the eigenspace overlaps (None: --seq-len / 8)",
                           "layers": "Layers to analyse, e.g. '0,2-4' (None: all)"})


@app.command()
def compare(
    run_a: Path = typer.Argument(..., help="First spectrum run directory."),
    run_b: Path = typer.Argument(..., help="Second spectrum run directory (same --seq-len)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Write the overlap into this run directory's results."),
) -> None:
    """Layer x layer eigenspace overlap between two spectrum runs (e.g. two models)."""
    from .spectral.compare import compare_runs

    res = compare_runs(run_a, run_b, out)
    typer.echo(f"rows = A: {res['label_a']}; columns = B: {res['label_b']}; k = {res['k']}, chance {res['chance']:.2f}")
    typer.echo("A \\ B   " + " ".join(f"L{l:<4d}" for l in res["layers_b"]))
    for l, row in zip(res["layers_a"], res["overlap"]):
        typer.echo(f"L{l:<7d} " + " ".join(f"{v:5.2f}" for v in row))
    if res.get("noise_floor"):
        d = res["noise_floor"]["diagonal"]
        typer.echo(f"noise floor (two halves of A's windows, same layer): {min(d):.2f}-{max(d):.2f}")
    if out is not None:
        _render(out)


@app.command()
def views(
    out: Path = typer.Option(..., "--out", help="Run directory (views.safetensors, report.html)."),
    text: str = typer.Option(..., "--text", help="The text whose attention to draw (tokenized as the model does)."),
    model: Optional[str] = ModelOpt, layers: Optional[str] = LayersOpt, heads: Optional[str] = HeadsOpt,
    max_tokens: int = typer.Option(40, "--max-tokens", help="Tokens drawn per heatmap axis (longer texts are cut, "
                                                            "with a note)."),
    budget: float = typer.Option(0.25, "--budget", help="Share of key blocks per query block that the drawn "
                                                        "sparse_attention block mask may keep."),
    device: Optional[str] = DeviceOpt,
    quiet: bool = typer.Option(False, "--quiet", help=QUIET_HELP),
) -> None:
    """Attention heatmaps (per layer and head, token labels) and sparse_attention's block mask for your text.

    Example: attnlab views --out runs/views --text "The cat sat on the mat." --layers 0,5
    """
    from .report.views import attention_views

    meta = attention_views(out, text, model or "minilm", parse_int_list(layers, "--layers"),
                           parse_int_list(heads, "--heads"), max_tokens=max_tokens, device=device or "cpu",
                           budget=budget)
    from .report.html import render_report

    typer.echo(f"{meta['seq_len']} tokens, layers {meta['layers']}, heads {meta['heads']}")
    typer.echo(f"report: {render_report(out).resolve()}")


@app.command()
def report(run_dir: Path = typer.Argument(..., help="Run directory to render."),
           speed: Optional[list[Path]] = typer.Argument(
               None, help="GPU speed results to add first: JSON of benchmarks/prefill.py, benchmarks/sparse_entmax.py "
                          "or `attnlab sparsity prefill --out FILE.json`.")) -> None:
    """Render every section of a run directory into one self-contained report.html.

    Example: attnlab report runs/demo results/prefill.json
    """
    from .report.html import render_report

    if speed:
        from .report.speed import import_speed

        import_speed(run_dir, list(speed))

    typer.echo(f"report: {render_report(run_dir, strict=True).resolve()}")


def _render(run_dir: Path) -> None:
    from .cli_utils import write_report

    write_report(run_dir)


@app.command()
def demo(
    out: Path = typer.Option(Path("runs/demo"), "--out", help="Run directory (every pillar's results.json section, "
                                                             "PNGs and report.html)."),
    n_sequences: Optional[int] = typer.Option(None, "--n-sequences", show_default=False,
                                              help="Windows of stdlib docstrings for the spectrum [default: 64; "
                                                   "16 with --quick]."),
    seq_len: Optional[int] = typer.Option(None, "--seq-len", show_default=False,
                                          help="Tokens per window [default: 128; 64 with --quick]."),
    pillars: str = typer.Option("spectrum,reconstruct,sparsity,variables", "--pillars",
                                help="Comma-separated subset of spectrum,reconstruct,sparsity,variables."),
    quick: bool = typer.Option(False, "--quick", help="Smallest settings of every pillar: a smoke test of every "
                                                      "report view, not a measurement."),
    quiet: bool = typer.Option(False, "--quiet", help=QUIET_HELP),
) -> None:
    """Every pillar on the packaged MiniLM and stdlib docstrings, then report.html and one bottom line per pillar.

    Example: attnlab demo --out runs/demo

    Time: see attnlab.demo.MEASURED (printed below); re-measure with benchmarks/defaults_time.py --only demo.
    """
    from .demo import PILLARS, bottom_lines, run_demo
    from .errors import ConfigError

    chosen = tuple(p.strip() for p in pillars.split(",") if p.strip())
    unknown = set(chosen) - set(PILLARS)
    if unknown or not chosen:
        raise ConfigError(f"--pillars: unknown or empty {sorted(unknown)}; choose from {', '.join(PILLARS)}")
    # --quick sets the sizes it needs only where the flag was not given (an explicit size always wins)
    n_sequences = n_sequences if n_sequences is not None else 16 if quick else 64
    seq_len = seq_len if seq_len is not None else 64 if quick else 128
    path = run_demo(out, n_sequences=n_sequences, seq_len=seq_len, quick=quick, pillars=chosen,
                    progress=not quiet)
    typer.echo(f"report: {path.resolve()}")
    for line in bottom_lines(out):
        typer.echo(f"- {line}")


def _demo_help() -> None:
    """Put the measured time into `attnlab demo --help` (the docstring cannot hold a computed value)."""
    from .demo import MEASURED

    demo.__doc__ = (demo.__doc__ or "").replace("see attnlab.demo.MEASURED (printed below)", MEASURED)


_demo_help()


from .reconstruct.cli import app as _reconstruct_app  # noqa: E402  (light: heavy imports live inside commands)
from .sparsity.cli import app as _sparsity_app  # noqa: E402
from .blocksparse.cli import register as _register_blocksparse  # noqa: E402

_register_blocksparse(_sparsity_app)  # `attnlab sparsity prefill` (block-sparse execution; sparsity/ never imports it)
from .variables.cli import app as _variables_app  # noqa: E402
from .lm.cli import app as _lm_app  # noqa: E402

app.add_typer(_reconstruct_app, name="reconstruct", help="Reconstruct attention scores from a subset of query-key pairs.")
app.add_typer(_sparsity_app, name="sparsity", help="Sparsefinder: entmax attention graphs and learned sparsity predictors.")
app.add_typer(_lm_app, name="lm", help="Reference trained long-context LM (byte-level Llama on the stdlib source).")
app.add_typer(_variables_app, name="variables",
              help="Variable creation: sparse Boolean tasks, sample complexity vs context length.")


def split_config_flag(argv: list[str]) -> tuple[list[str], Optional[str]]:
    """Remove `--config PATH` / `--config=PATH` (any position) from argv; return (argv, path)."""
    from .errors import ConfigError

    out, path, i = [], None, 0
    while i < len(argv):
        a = argv[i]
        if a == "--config":
            if i + 1 >= len(argv):
                raise ConfigError("--config needs a TOML file path")
            path, i = argv[i + 1], i + 2
            continue
        if a.startswith("--config="):
            path = a.split("=", 1)[1]
        else:
            out.append(a)
        i += 1
    return out, path


def default_map(path: str) -> dict[str, Any]:
    """Turn a TOML file into click's nested default_map, checking every key against the commands' options."""
    import typer.main

    from .config import read_toml
    from .errors import ConfigError

    def build(cmd, table: dict[str, Any], where: str) -> dict[str, Any]:
        subs = getattr(cmd, "commands", None)
        if subs is not None:  # a group: its tables name subcommands
            out = {}
            for name, value in table.items():
                if name not in subs or not isinstance(value, dict):
                    raise ConfigError(f"--config {path}: [{where}{name}] is not a command (known: {', '.join(subs)})")
                out[name] = build(subs[name], value, f"{where}{name}.")
            return out
        params = {p.name: p for p in cmd.params}
        out = {}
        for key, value in table.items():
            name = key.replace("-", "_")
            if name in out:
                raise ConfigError(f"--config {path}: [{where.rstrip('.')}] sets {name!r} twice (as "
                                  f"{name.replace('_', '-')!r} and {name!r}); keep one")
            if isinstance(value, bool) and name in params and not getattr(params[name], "is_flag", False):
                raise ConfigError(f"--config {path}: [{where.rstrip('.')}] {key} = {str(value).lower()}: expected "
                                  "a value of the option's type, not true/false")
            if name not in params:
                raise ConfigError(f"--config {path}: [{where.rstrip('.')}] has no option {key!r} "
                                  f"(known: {', '.join(sorted(params))})")
            if isinstance(value, list) and not getattr(params[name], "multiple", False):
                value = ",".join(str(v) for v in value)
            try:  # type errors name the file and table, not only the option
                params[name].process_value(cmd.context_class(cmd), value)
            except Exception as e:  # click's BadParameter (typer vendors its own click)
                msg = getattr(e, "message", None) or str(e)
                raise ConfigError(f"--config {path}: [{where.rstrip('.')}] {key} = {value!r}: {msg}") from None
            out[name] = value
        return out

    return build(typer.main.get_command(app), read_toml(path), "")


def command():
    """The click command of the app, hardened (see :func:`attnlab.cli_utils.harden`)."""
    import typer.main

    from .cli_utils import harden

    return harden(typer.main.get_command(app))


def run_cli(argv: list[str]) -> None:
    """Run the app on ``argv`` with --config applied (what `main` does, without exiting on attnlab errors)."""
    argv, config_path = split_config_flag(list(argv))
    extra = {"default_map": default_map(config_path)} if config_path else {}
    command()(args=argv, prog_name="attnlab", **extra)


def _interrupted(signum, frame) -> None:
    raise KeyboardInterrupt  # the command wrapper (see harden) prints what to do and exits with code 130


def invoke(argv: list[str]) -> int:
    """Run the CLI on ``argv`` in this process and return the exit code (attnlab errors: one line, code 2)."""
    from .errors import AttnlabError

    try:
        run_cli(argv)
    except AttnlabError as e:
        typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
        return 2
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return 0


def main() -> None:
    """Entry point: attnlab errors become one clear line and exit code 2, Ctrl-C exit code 130."""
    import signal

    signal.signal(signal.SIGINT, _interrupted)
    sys.exit(invoke(sys.argv[1:]))


if __name__ == "__main__":
    main()
