"""Settings of one sparse-prefill measurement (no torch import: ``--help`` reads them)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ...errors import ConfigError

__all__ = ["NOTICE_CPU", "PrefillConfig", "remainder_names"]

NOTICE_CPU = "no CUDA: the exact masked path ran instead of FlexAttention; timings are not meaningful"


def remainder_names() -> tuple[str, ...]:
    """Every ``--remainder`` accepted: ``attnlab.blocksparse.remainder.REMAINDERS`` when that module exists
    (with 'none'), else only 'none' (skipped tiles contribute nothing)."""
    try:
        from ..remainder import REMAINDERS
    except ModuleNotFoundError as e:
        if e.name != "attnlab.blocksparse.remainder":
            raise
        return ("none",)
    names = REMAINDERS.names() if hasattr(REMAINDERS, "names") else list(REMAINDERS)
    return ("none", *(str(n) for n in names if n != "none"))


@dataclass(frozen=True)
class PrefillConfig:
    """Settings of one sparse-prefill measurement."""

    model: str
    seq_len: int = 16384
    predictor: str = "pooled"
    recall: float = 0.95
    block_size: int = 128
    windows: int = 2
    rows: int = 256
    reps: int = 3
    fallback: bool = True
    device: str = "auto"
    seed: int = 0
    calibration: str = "online"
    knobs: Optional[str] = None
    fit_windows: int = 2
    check_rows: int = 64
    head_policy: str = "layer"
    kernel: str = "default"
    remainder: str = "none"

    def __post_init__(self) -> None:
        if self.calibration not in ("online", "offline"):
            raise ConfigError(f"--calibration must be 'online' or 'offline', got {self.calibration!r}")
        if self.head_policy not in ("layer", "head"):
            raise ConfigError(f"--head-policy must be 'layer' or 'head', got {self.head_policy!r}")
        if self.kernel not in ("default", "tuned"):
            raise ConfigError(f"--kernel must be 'default' or 'tuned', got {self.kernel!r}")
        if self.fit_windows < 1 or self.check_rows < 2:
            raise ConfigError(f"--fit-windows must be >= 1 and --check-rows >= 2, got {self.fit_windows}, "
                              f"{self.check_rows}")
        if self.remainder not in remainder_names():
            raise ConfigError(f"--remainder must be one of {remainder_names()}, got {self.remainder!r}")
        if self.seq_len < 2:
            raise ConfigError(f"--seq-len must be >= 2, got {self.seq_len}")
        if not 0.0 < self.recall <= 1.0:
            raise ConfigError(f"--recall must be in (0, 1], got {self.recall}")
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise ConfigError(f"--block-size must be a power of two >= 16, got {self.block_size}")
        for name in ("windows", "rows", "reps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name} must be >= 1, got {getattr(self, name)}")
