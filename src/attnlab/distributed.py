"""torchrun integration: rank/world from the environment, process group set-up, work sharding, rank-0 writes.

Pattern for a workload: ``info = init_distributed(device)``; ``mine = shard(items, info)``; compute; merge with
:func:`gather_ordered` (per-item Python results, original order) or an exact all-reduce of sums
(:meth:`attnlab.spectral.stats.StreamingCovariance.all_reduce`, :func:`all_reduce_sum_`); rank 0 writes.
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Optional, Sequence, TypeVar

import torch

T = TypeVar("T")


@dataclass
class DistInfo:
    """Where this process stands in a (possibly single-process) run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """True on rank 0 (the rank that writes the run directory)."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        """True when more than one process takes part."""
        return self.world_size > 1


def init_distributed(device: str = "cpu") -> DistInfo:
    """Initialise ``torch.distributed`` when launched by torchrun (gloo on CPU, nccl on CUDA); else single process."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    info = DistInfo(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(info.local_rank)
        dist.init_process_group(backend=backend)
        dist.barrier()  # set up communicators now, so that timed work does not pay for it
        # Tear the group down before the interpreter does: a gloo group left to static destruction can abort
        # ("terminate called without an active exception") on a loaded machine. No barrier here, so a rank
        # that exits on an error never waits for its peers.
        atexit.register(_destroy_process_group)
    return info


def finish() -> None:
    """Successful end of a command under torchrun: wait for every rank, then tear the group down. A rank that
    finished early (its shard done, rank 0 still writing) would otherwise tear its gloo connections down under a
    peer that still holds them, which can abort the process. A failing rank never gets here: torchrun stops the
    others."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _destroy_process_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def is_main_process() -> bool:
    """True unless torchrun launched this process with a rank other than 0 (reads RANK; needs no process group)."""
    return int(os.environ.get("RANK", "0")) == 0


def current_info() -> DistInfo:
    """Rank and world of the running process group (``init_distributed`` already called), else single-process."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return DistInfo()
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def device_for(info: DistInfo, device: str) -> str:
    """Per-rank device: 'cuda' becomes 'cuda:<local_rank>' under torchrun."""
    if device == "cuda" and info.enabled:
        return f"cuda:{info.local_rank}"
    return device


def barrier(info: DistInfo) -> None:
    """Synchronise ranks (no-op in a single process)."""
    if info.enabled:
        import torch.distributed as dist

        dist.barrier()


# ------------------------------------------------------------------------------------------------------------
# Work sharding and result gathering (torchrun; every helper is the identity in a single process)
# ------------------------------------------------------------------------------------------------------------


def shard_indices(n: int, info: DistInfo) -> list[int]:
    """Indices of ``n`` work items that this rank handles: round-robin, ``rank, rank + world, ...``."""
    return list(range(info.rank, n, info.world_size))


def shard(items: Sequence[T], info: DistInfo) -> list[T]:
    """This rank's share of ``items`` (round-robin by rank; the whole list in a single process)."""
    return [items[i] for i in shard_indices(len(items), info)]


def unshard(parts: Sequence[Sequence[T]], n: int) -> list[T]:
    """Inverse of :func:`shard`: per-rank lists (rank order) back to the original order of ``n`` items."""
    world = len(parts)
    if sum(len(p) for p in parts) != n:
        raise ValueError(f"unshard: {sum(len(p) for p in parts)} results for {n} items")
    return [parts[i % world][i // world] for i in range(n)]


def gather_ordered(local: Sequence[T], n: int, info: DistInfo, to_all: bool = False) -> Optional[list[T]]:
    """Results of :func:`shard` ed work from every rank, in the original order of the ``n`` items.

    Rank 0 gets the list (every rank when ``to_all``); the others get None. Objects travel pickled
    (``gather_object`` / ``all_gather_object``), so keep them small: numbers, lists, dicts, small tensors on CPU.
    """
    if not info.enabled:
        return list(local)
    import torch.distributed as dist

    if to_all:
        parts: list[Any] = [None] * info.world_size
        dist.all_gather_object(parts, list(local))
        return unshard(parts, n)
    parts_0: Optional[list[Any]] = [None] * info.world_size if info.is_main else None
    dist.gather_object(list(local), parts_0, dst=0)
    return unshard(parts_0, n) if info.is_main else None


def gather_lists(local: Sequence[T], info: DistInfo, to_all: bool = False) -> Optional[list[T]]:
    """Concatenation of every rank's list in rank order (rank 0, or every rank when ``to_all``; else None)."""
    if not info.enabled:
        return list(local)
    import torch.distributed as dist

    parts: Optional[list[Any]] = [None] * info.world_size if (to_all or info.is_main) else None
    if to_all:
        dist.all_gather_object(parts, list(local))
    else:
        dist.gather_object(list(local), parts, dst=0)
    if parts is None:
        return None
    return [x for p in parts for x in p]


def broadcast_object(obj: T, info: DistInfo, src: int = 0) -> T:
    """Rank ``src``'s ``obj`` on every rank (pickled; the identity in a single process)."""
    if not info.enabled:
        return obj
    import torch.distributed as dist

    box = [obj if info.rank == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def comm_device() -> torch.device:
    """Where collective tensors must live: this rank's GPU for nccl, the CPU for gloo."""
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_(t: torch.Tensor, group=None) -> torch.Tensor:
    """Sum ``t`` across ranks in place, wherever it lives (a CPU tensor travels through the GPU under nccl)."""
    import torch.distributed as dist

    dev = comm_device()
    if t.device == dev:
        dist.all_reduce(t, group=group)
        return t
    buf = t.to(dev)
    dist.all_reduce(buf, group=group)
    t.copy_(buf)
    return t


def all_reduce_sum_(tensors: Sequence[torch.Tensor], info: DistInfo) -> None:
    """Sum tensors across ranks in place; floating tensors travel as float64, so the merge adds no rounding
    beyond float64's (results equal the single-process sums to float tolerance, not bit for bit)."""
    if not info.enabled:
        return
    for t in tensors:
        if t.is_floating_point() and t.dtype != torch.float64:
            t.copy_(all_reduce_(t.double()))
        else:
            all_reduce_(t)


def require_work_per_rank(n: int, info: DistInfo, flag: str) -> None:
    """ConfigError when fewer than one work item per rank (a rank with nothing to do would stall collectives)."""
    if n < info.world_size:
        from .errors import ConfigError

        raise ConfigError(f"{flag} {n}: fewer than the {info.world_size} torchrun processes; give each at least one")


# ------------------------------------------------------------------------------------------------------------
# Data-parallel fitting over round-robin sharded windows (sparsity predictors; identities in a single process)
# ------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WindowShard:
    """This rank's round-robin share of ``n`` windows: local window i is global window ``rank + i * world``.

    Data-parallel fitting with it gives every rank the same state: minibatches are drawn as global window indices
    (the same permutation everywhere), sums are all-reduced in float64, per-window samples are drawn from
    :func:`window_generator` and gathered in global window order. ``WindowShard.single(n)`` is the single-process
    case, where every helper is the identity."""

    n: int
    info: DistInfo = field(default_factory=DistInfo)

    @staticmethod
    def single(n: int) -> "WindowShard":
        """All ``n`` windows in this process."""
        return WindowShard(n, DistInfo())

    @cached_property
    def indices(self) -> list[int]:
        """Global indices of this rank's windows, in local order (computed once: callers index it in loops)."""
        return shard_indices(self.n, self.info)

    @property
    def n_local(self) -> int:
        """Number of windows this rank holds."""
        return len(self.indices)

    def mine(self, global_idx: Sequence[int]) -> tuple[list[int], list[int]]:
        """(local positions, global indices) of those of ``global_idx`` (in that order) that this rank holds."""
        w, r = self.info.world_size, self.info.rank
        glob = [int(g) for g in global_idx if int(g) % w == r]
        return [g // w for g in glob], glob

    def sum_(self, tensors: Sequence[torch.Tensor]) -> None:
        """All-reduce (sum) in place across ranks (float64 on the wire; the identity in a single process)."""
        all_reduce_sum_(tensors, self.info)

    def gather(self, per_window: Sequence[T]) -> list[T]:
        """One item per local window -> every window's item, in global window order, on every rank."""
        if len(per_window) != self.n_local:
            raise ValueError(f"gather: {len(per_window)} items for {self.n_local} local windows")
        return gather_ordered(per_window, self.n, self.info, to_all=True)  # type: ignore[return-value]


def window_generator(seed: int, *keys: int) -> torch.Generator:
    """A CPU generator seeded from (seed, keys...), e.g. (seed, epoch, global window): draws that do not depend on
    how windows are sharded or batched."""
    import hashlib

    h = hashlib.blake2b(repr((int(seed), *(int(k) for k in keys))).encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(h, "little") >> 1)


def per_window_cap(total: int, n_windows: int) -> int:
    """Samples per window when a pool of at most ``total`` is drawn evenly from ``n_windows`` windows (>= 1)."""
    return max(1, int(total) // max(int(n_windows), 1))
