"""Small helpers shared by the pillar command lines (kept free of heavy imports)."""

from __future__ import annotations

import logging
import sys
from typing import NoReturn, Optional, Sequence

import typer
from typer.core import TyperCommand, TyperGroup


def fail(e: Exception) -> NoReturn:
    """Report an attnlab error as one red line and exit with code 2 (no traceback)."""
    typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


def split_words(values: Optional[Sequence[str]]) -> Optional[list[str]]:
    """Flatten repeated and comma/space-separated option values ('a,b' 'c' -> ['a', 'b', 'c']); None if empty."""
    if not values:
        return None
    return [p for v in values for p in str(v).replace(",", " ").split()]


def parse_int_list(text: Optional[str | list], flag: str) -> Optional[list[int]]:
    """Parse '0,2-4' (or a TOML list) into [0, 2, 3, 4]."""
    from .errors import ConfigError
    from .validate import MAX_RANGE

    if text is None:
        return None
    if isinstance(text, list):
        return [int(x) for x in text]
    out: list[int] = []
    try:
        for part in str(text).split(","):
            part = part.strip()
            if not part:
                continue
            if "-" in part[1:]:
                a, b = part.split("-", 1)
                if int(b) < int(a):
                    raise ConfigError(f"{flag} {text!r}: range {part!r} is reversed; write it as '{b}-{a}'")
                if int(b) - int(a) >= MAX_RANGE:
                    raise ConfigError(f"{flag} {text!r}: range {part!r} has more than {MAX_RANGE} values")
                out.extend(range(int(a), int(b) + 1))
            else:
                out.append(int(part))
    except ConfigError:
        raise
    except ValueError as e:
        raise ConfigError(f"{flag} {text!r}: expected integers like '0,2-4'") from e
    if not out:
        raise ConfigError(f"{flag} is empty; leave it out for all")
    return out


def write_report(out) -> None:
    """Render ``out``/report.html and print its path (every command that writes a run directory calls this)."""
    from pathlib import Path

    from .report.html import render_report

    if not (Path(out) / "results.json").is_file():
        typer.echo(f"report: none ({out} has no results.json yet)")
        return
    typer.echo(f"report: {render_report(out).resolve()} (re-render with `attnlab report {out}`)")


# Options / arguments naming a path: an empty value would silently mean the current directory.
PATH_OPTIONS = ("out", "corpus", "checkpoint", "model", "fit_path", "spectrum", "run_dir", "run_a", "run_b",
                "tensorboard")
READ_ONLY_COMMANDS = ("table",)  # their --out is read, not written: no lock, no creation
FILE_OUT_COMMANDS = ()  # (kept for imports) commands now say which file suffixes their --out takes: out_files()
# Suffixes that make an --out value look like a file: a command whose --out is a run directory refuses them.
FILE_SUFFIXES = (".json", ".safetensors", ".pt", ".bin", ".html", ".png", ".txt", ".toml", ".csv", ".jsonl")


def out_files(*suffixes: str, inside: Optional[str] = None):
    """Decorator for a command callback: besides a run directory, its --out may name a file with these suffixes;
    ``inside``: the file it writes within a run directory (checked for a foreign file with the --out lock)."""
    def mark(fn):
        fn._attnlab_out_files = tuple(suffixes)
        fn._attnlab_out_inside = inside
        return fn
    return mark


def out_kind(value, files: Sequence[str] = ()) -> str:
    """'file' when ``value`` ends in one of ``files``, else 'dir'; a file-like value for a run directory is refused
    with a clear error (it would otherwise become a directory named like a file)."""
    from pathlib import Path

    from .errors import ConfigError

    suffix = Path(str(value)).suffix.lower()
    if suffix and suffix in files:
        return "file"
    if suffix in FILE_SUFFIXES:
        also = f" (or a {' / '.join(files)} file)" if files else ""
        raise ConfigError(f"--out {value}: looks like a file; this command writes a run directory{also}, "
                          f"e.g. --out {Path(str(value)).with_suffix('')}")
    return "dir"


def _check_values(params: dict, kwargs: dict) -> None:
    """Validate every given option by name (attnlab.validate.RULES), floats finite, paths non-empty."""
    from .errors import ConfigError
    from .validate import check_option, finite, flag_of

    for name, value in kwargs.items():
        p = params.get(name)
        flag = next((o for o in getattr(p, "opts", ()) if o.startswith("--")), None) or flag_of(name)
        if name in PATH_OPTIONS and value is not None and not str(value).strip():
            raise ConfigError(f"{flag} is empty; give a path" if flag.startswith("--") else f"{name} is empty; give a path")
        if isinstance(value, (list, tuple)):  # list options: every number finite (rules are for scalars)
            for v in value:
                if isinstance(v, float):
                    finite(v, flag)
        elif isinstance(value, (int, float)) or name in ("device", "seed"):
            check_option(name, value, flag)


class _EchoWarnings(logging.Handler):
    """Show attnlab's log warnings on the current stderr as 'warning: ...' lines."""

    def emit(self, record: logging.LogRecord) -> None:
        typer.secho(f"{record.levelname.lower()}: {record.getMessage()}", err=True,
                    fg=typer.colors.YELLOW if record.levelno >= logging.WARNING else None)


def show_warnings() -> None:
    """Make the CLI print warnings of the 'attnlab' logger (fewer windows than asked, skipped steps)."""
    logger = logging.getLogger("attnlab")
    if not logger.handlers:  # the CLI's own handler (attnlab.logs.setup_cli_logging), if installed, shows them
        h = _EchoWarnings(logging.WARNING)
        logger.addHandler(h)
        if logger.level == logging.NOTSET or logger.level > logging.WARNING:
            logger.setLevel(logging.WARNING)


def _guard_empty(param) -> None:
    """Refuse an empty path value while parsing (typer turns '' into Path('.'), the current directory)."""
    from .errors import ConfigError

    orig = param.process_value

    def process_value(ctx, value):
        for v in (value if isinstance(value, (list, tuple)) else [value]):
            if isinstance(v, str) and not v.strip():
                flag = next((o for o in param.opts if o.startswith("--")), param.name)
                raise ConfigError(f"{flag} is empty; give a path")
        return orig(ctx, value)

    param.process_value = process_value


def _rank0_output():
    """Under torchrun, ranks other than 0 print nothing on stdout and log only errors (every result line once)."""
    import contextlib
    import os

    if int(os.environ.get("RANK", "0") or 0) == 0:  # (attnlab.distributed.is_main_process, without importing torch)
        return contextlib.nullcontext()
    logging.getLogger("attnlab").setLevel(logging.ERROR)
    stack = contextlib.ExitStack()
    stack.enter_context(contextlib.redirect_stdout(stack.enter_context(open(os.devnull, "w"))))
    return stack


def _prepare_output(kwargs: dict) -> None:
    """Before a command runs: warnings shown; off a terminal no transformers / hub tqdm bars ("Writing model
    shards"); --quiet means the same everywhere (no progress lines, no info messages)."""
    show_warnings()
    if not sys.stderr.isatty():
        import os

        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        if "transformers" in sys.modules:
            sys.modules["transformers"].utils.logging.disable_progress_bar()
    if kwargs.get("quiet"):
        logging.getLogger("attnlab").setLevel(logging.WARNING)


def _guarded_call(orig, args: tuple, kwargs: dict, params: dict, lock_out: bool, files, inside, can_resume: bool):
    """``orig(*args, **kwargs)`` with the option values checked and --out locked; attnlab errors and full disks
    become one line + exit 2, Ctrl-C a hint + exit 130; under torchrun every rank ends together."""
    import errno

    from .errors import AttnlabError
    from .io import lock_output, os_error

    try:
        _check_values(params, kwargs)
        if lock_out and kwargs.get("out") is not None:
            with lock_output(kwargs["out"], "--out", out_kind(kwargs["out"], files), inside=inside):
                out = orig(*args, **kwargs)
        else:
            out = orig(*args, **kwargs)
        if "torch.distributed" in sys.modules:  # (commands that never load torch skip the import)
            from .distributed import finish

            finish()  # torchrun: every rank ends together (no-op in a single process)
        return out
    except AttnlabError as e:
        fail(e)
    except KeyboardInterrupt:
        hint = ("re-run the same command with --resume to continue" if can_resume else
                "this command cannot continue an interrupted run; re-run it to start over")
        typer.secho(f"interrupted: files written so far are intact; {hint}", err=True)
        raise typer.Exit(130) from None
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES):
            action = "access" if e.errno == errno.EACCES else "write"
            fail(os_error(e, e.filename or kwargs.get("out") or "output", action))
        raise


def harden(cmd):
    """Wrap every command's callback (once): options validated before any work (attnlab.validate.RULES; no NaN/inf),
    --out checked and locked against concurrent runs, attnlab errors and full disks as one line + exit 2,
    Ctrl-C as a hint + exit 130. Works on any click command tree (hand-written or generated options)."""
    import functools

    if hasattr(cmd, "commands"):  # a group (typer vendors its own click: no isinstance check)
        for sub in cmd.commands.values():
            harden(sub)
        return cmd
    orig = cmd.callback
    if orig is None or getattr(orig, "_attnlab_hardened", False):
        return cmd
    params = {p.name: p for p in cmd.params}
    for name in PATH_OPTIONS:
        if name in params:
            _guard_empty(params[name])
    # --resume continues an interrupted run, unless the command says it only keeps finished results
    can_resume = "resume" in params and getattr(orig, "_attnlab_resume_interrupted", True)
    files = getattr(orig, "_attnlab_out_files", ())
    inside = getattr(orig, "_attnlab_out_inside", None)  # the file written inside a run directory --out
    lock_out = "out" in params and cmd.name not in READ_ONLY_COMMANDS

    @functools.wraps(orig)
    def run(*args, **kwargs):
        _prepare_output(kwargs)
        with _rank0_output():
            return _guarded_call(orig, args, kwargs, params, lock_out, files, inside, can_resume)

    run._attnlab_hardened = True
    cmd.callback = run
    return cmd


class HardenedGroup(TyperGroup):
    """The click group of every attnlab Typer app: hardens its command tree (see :func:`harden`) before running, so
    the app behaves the same from ``attnlab ...``, ``CliRunner().invoke(app, ...)`` and a pillar's own sub-app."""

    def main(self, *args, **kwargs):
        harden(self)
        return super().main(*args, **kwargs)


class HardenedCommand(TyperCommand):
    """:class:`HardenedGroup` for a command run on its own (a one-command app collapses into its command)."""

    def main(self, *args, **kwargs):
        harden(self)
        return super().main(*args, **kwargs)

    def format_help(self, ctx, formatter):
        """The help page, with option help read late from registries (cli_config.fill_late_help)."""
        from .cli_config import fill_late_help

        fill_late_help(self)
        return super().format_help(ctx, formatter)
