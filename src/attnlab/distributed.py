"""torchrun integration: rank/world from the environment, process group set-up, rank-0 writes."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


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
    return info


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
