"""Progress of long steps: one live line (name, bar, count, ETA) on a terminal, plain log lines otherwise.

On a terminal (stderr is a TTY) a transient rich line shows the step's name, its progress and the time left.
Elsewhere (piped through ``tee``, a CI log) the step writes one line when it ends, naming the step, the count
and the time it took, and, for a step that lasts longer than :data:`HEARTBEAT_S`, a line with the count and
an ETA every :data:`HEARTBEAT_S` seconds, so a log never stays silent for minutes. Under torchrun only rank 0
shows progress.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Callable, Iterable, Iterator, Optional, TypeVar

T = TypeVar("T")

_log = logging.getLogger(__name__)

#: Seconds between two plain progress lines of one step when the output is not a terminal.
HEARTBEAT_S = 60.0


def _is_main() -> bool:
    try:
        from .distributed import is_main_process
    except ImportError:  # pragma: no cover - distributed always importable in the package
        return True
    return is_main_process()


def fmt_seconds(s: float) -> str:
    """'42 s', '3.5 min' or '1.2 h'."""
    return f"{s:.0f} s" if s < 90 else f"{s / 60:.1f} min" if s < 5400 else f"{s / 3600:.1f} h"


class PlainProgress:
    """Counts steps and writes log lines: a heartbeat with an ETA every ``heartbeat`` seconds, one at the end."""

    def __init__(self, desc: str, total: Optional[int], say: Callable[[str], None],
                 heartbeat: float = HEARTBEAT_S, clock: Callable[[], float] = time.perf_counter) -> None:
        self.desc, self.total, self.say, self.heartbeat, self.clock = desc, total, say, heartbeat, clock
        self.t0 = self.last = clock()
        self.n = 0

    def advance(self, k: int = 1) -> None:
        self.n += k
        now = self.clock()
        if now - self.last >= self.heartbeat:
            self.last = now
            self.say(self.status(now))

    def status(self, now: float) -> str:
        """'desc: 3/10, 1.2 min so far, about 2.8 min left'."""
        el = now - self.t0
        line = f"{self.desc}: {self.n}" + (f"/{self.total}" if self.total else "") + f", {fmt_seconds(el)} so far"
        if self.total and self.n:
            line += f", about {fmt_seconds(el / self.n * (self.total - self.n))} left"
        return line

    def done(self) -> None:
        self.say(f"{self.desc}: {self.n}" + (f"/{self.total}" if self.total else "")
                 + f" done in {fmt_seconds(self.clock() - self.t0)}")


def progress_bar(items: Iterable[T], desc: str = "", enabled: bool = True, total: int | None = None) -> Iterator[T]:
    """Iterate with a live rich line (name, bar, count, ETA) on a TTY; with plain log lines otherwise.

    ``enabled=False`` (e.g. ``--quiet``) iterates silently."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    if not enabled or not _is_main():
        yield from items
        return
    if not sys.stderr.isatty():
        p = PlainProgress(desc or "step", total, _log.info)
        for item in items:
            yield item
            p.advance()
        p.done()
        return
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("ETA"), TimeRemainingColumn(), transient=True) as prog:
        task = prog.add_task(desc, total=total)
        for item in items:
            yield item
            prog.advance(task)
