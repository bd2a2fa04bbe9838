"""Settings of one sparse-prefill measurement (no torch import: ``--help`` reads them)."""

from __future__ import annotations

from dataclasses import dataclass

from ...errors import ConfigError

__all__ = ["NOTICE_CPU", "PrefillConfig"]

NOTICE_CPU = "no CUDA: the exact masked path ran instead of FlexAttention; timings are not meaningful"


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

    def __post_init__(self) -> None:
        if self.seq_len < 2:
            raise ConfigError(f"--seq-len must be >= 2, got {self.seq_len}")
        if not 0.0 < self.recall <= 1.0:
            raise ConfigError(f"--recall must be in (0, 1], got {self.recall}")
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise ConfigError(f"--block-size must be a power of two >= 16, got {self.block_size}")
        for name in ("windows", "rows", "reps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name} must be >= 1, got {getattr(self, name)}")
