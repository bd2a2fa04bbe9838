"""Logging for attnlab: library modules log through ``logging.getLogger(__name__)``; nothing prints.

The library adds only a NullHandler (Python's convention: the application decides where messages go).
The CLI calls :func:`setup_cli_logging`, which shows INFO and above as plain lines on stdout (where the
progress lines always were; warnings and errors go to stderr).
"""

from __future__ import annotations

import logging
import sys

logging.getLogger("attnlab").addHandler(logging.NullHandler())

_CLI_HANDLER_NAME = "attnlab-cli"


class _ConsoleHandler(logging.StreamHandler):
    """INFO/DEBUG to the current sys.stdout, WARNING and above to the current sys.stderr (looked up per record,
    so that redirections, e.g. by test runners, are followed)."""

    def __init__(self) -> None:
        super().__init__()

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr if getattr(self, "_warn", False) else sys.stdout

    @stream.setter
    def stream(self, value) -> None:
        pass

    def emit(self, record: logging.LogRecord) -> None:
        self._warn = record.levelno >= logging.WARNING
        super().emit(record)


class _PrefixFormatter(logging.Formatter):
    """Plain messages; warnings and errors start with 'warning: ' / 'error: ' (what the README promises)."""

    def format(self, record: logging.LogRecord) -> str:
        msg = super().format(record)
        return f"{record.levelname.lower()}: {msg}" if record.levelno >= logging.WARNING else msg


def setup_cli_logging(level: str = "INFO") -> None:
    """Show attnlab's log records as plain lines (idempotent; ``level`` may change between calls)."""
    root = logging.getLogger("attnlab")
    root.setLevel(level)
    if not any(getattr(h, "name", None) == _CLI_HANDLER_NAME for h in root.handlers):
        h = _ConsoleHandler()
        h.name = _CLI_HANDLER_NAME
        h.setFormatter(_PrefixFormatter("%(message)s"))
        root.addHandler(h)

