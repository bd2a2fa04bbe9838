"""Small helpers shared by the pillar command lines (kept free of heavy imports)."""

from __future__ import annotations

from typing import NoReturn, Optional, Sequence

import typer


def fail(e: Exception) -> NoReturn:
    """Report an attnlab error as one red line and exit with code 2 (no traceback)."""
    typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


def split_words(values: Optional[Sequence[str]]) -> Optional[list[str]]:
    """Flatten repeated and comma/space-separated option values ('a,b' 'c' -> ['a', 'b', 'c']); None if empty."""
    if not values:
        return None
    return [p for v in values for p in str(v).replace(",", " ").split()]


def write_report(out) -> None:
    """Render ``out``/report.html and print its path (every command that writes a run directory calls this)."""
    from pathlib import Path

    from .report.html import render_report

    if not (Path(out) / "results.json").is_file():
        typer.echo(f"report: none ({out} has no results.json yet)")
        return
    typer.echo(f"report: {render_report(out).resolve()} (re-render with `attnlab report {out}`)")
