"""Wall-time measurement shared by prefill and the benchmarks: CUDA events on a GPU, ``perf_counter`` elsewhere."""

from __future__ import annotations

import time
from typing import Any, Callable

import torch


def time_ms(fn: Callable[[], Any], device: torch.device | str, reps: int, warmup: int = 1) -> list[float]:
    """Milliseconds of each of ``reps`` calls of ``fn``, after ``warmup`` untimed calls.

    On CUDA every call is bracketed by events and the device is synchronised before timing starts, so
    asynchronous work is counted where it runs; elsewhere a host clock times each call."""
    cuda = torch.device(device).type == "cuda"
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        if cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    return times


class Phases:
    """Wall time of the named phases of a run, for its results (``*_seconds`` keys land in timings.json).

    >>> ph = Phases()
    >>> with ph("fit"):
    ...     pass
    >>> sorted(ph.as_dict())
    ['fit_seconds']
    """

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def __call__(self, name: str) -> "_Phase":
        return _Phase(self, name)

    def as_dict(self) -> dict[str, float]:
        """``{name}_seconds`` -> seconds (rounded to ms), in the order the phases ran."""
        return {f"{k}_seconds": round(v, 3) for k, v in self.seconds.items()}


class _Phase:
    def __init__(self, owner: Phases, name: str) -> None:
        self.owner, self.name = owner, name

    def __enter__(self) -> "_Phase":
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.owner.seconds[self.name] = self.owner.seconds.get(self.name, 0.0) + time.perf_counter() - self.t0
