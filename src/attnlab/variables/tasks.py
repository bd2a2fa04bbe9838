"""Sparse Boolean tasks: T bits plus a readout (CLS) token, label = f(bits at s hidden positions).

Token ids: 0 and 1 are the bit values, 2 is the readout token placed at position 0, so bit ``i`` sits
at token position ``i + 1``. Everything (hidden positions, random truth table, samples) is a
deterministic function of the seed.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from ..errors import ConfigError

TASKS = ("parity", "and", "or", "majority", "random")
CLS_ID = 2
VOCAB_SIZE = 3
MAX_S = 20  # truth tables have 2**s rows

# Stream ids: separate random streams for the task itself and for each split.
_STREAM_TASK, _STREAM_TRAIN, _STREAM_TEST, _STREAM_VAL = 0, 1, 2, 3


def _rng(seed: int, *stream: int) -> np.random.Generator:
    """A NumPy generator for one named stream of ``seed``."""
    return np.random.default_rng(np.random.SeedSequence([int(seed) % 2**63, *stream]))


def boolean_function(name: str, bits: np.ndarray) -> np.ndarray:
    """Evaluate a named Boolean function row-wise on 0/1 ``bits`` of shape (n, s) -> (n,) in {0, 1}."""
    total = bits.sum(axis=1)
    s = bits.shape[1]
    if name == "parity":
        return (total % 2).astype(np.int64)
    if name == "and":
        return (total == s).astype(np.int64)
    if name == "or":
        return (total > 0).astype(np.int64)
    if name == "majority":
        return (2 * total > s).astype(np.int64)
    raise ConfigError(f"--task must be one of {', '.join(TASKS)} (got {name!r})")


@dataclass(frozen=True)
class Split:
    """Train/test (and validation) tensors: inputs (n, T + 1) token ids, labels (n,) in {0, 1}."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    val_x: Optional[torch.Tensor] = None
    val_y: Optional[torch.Tensor] = None


@dataclass(frozen=True)
class SparseBooleanTask:
    """An s-sparse Boolean function of T bits, read out through a CLS token (use :func:`make_task`)."""

    name: str
    T: int
    s: int
    seed: int
    relevant: tuple[int, ...]  # hidden bit indices (0-based over the T bits), sorted
    table: tuple[int, ...]  # truth table: row r = bits (b_0 .. b_{s-1}) read as binary, b_0 most significant
    balanced: bool = True  # sample labels 50/50 (relevant bits uniform within each label's preimage)
    noise: float = 0.0  # probability of flipping each *training* label (test/val stay clean)

    @property
    def vocab_size(self) -> int:
        """Number of token ids (0, 1, CLS)."""
        return VOCAB_SIZE

    @property
    def seq_len(self) -> int:
        """Sequence length including the readout token."""
        return self.T + 1

    @property
    def relevant_tokens(self) -> tuple[int, ...]:
        """Token positions of the relevant bits (bit index + 1, after the readout token)."""
        return tuple(i + 1 for i in self.relevant)

    def f(self, bits: np.ndarray | torch.Tensor) -> np.ndarray:
        """Labels of 0/1 patterns of the s relevant bits, shape (n, s) -> (n,)."""
        b = np.asarray(bits, dtype=np.int64).reshape(-1, self.s)
        rows = b @ (1 << np.arange(self.s - 1, -1, -1, dtype=np.int64))
        return np.asarray(self.table, dtype=np.int64)[rows]

    def label(self, x: np.ndarray | torch.Tensor) -> np.ndarray:
        """Clean labels of full inputs: 0/1 bits (n, T), +/-1 bits (n, T), or token ids with CLS (n, T + 1)."""
        a = np.asarray(x.cpu() if isinstance(x, torch.Tensor) else x, dtype=np.int64)
        if a.ndim == 1:
            a = a[None]
        if a.shape[1] == self.T + 1:
            a = a[:, 1:]
        elif a.shape[1] != self.T:
            raise ConfigError(f"inputs have length {a.shape[1]}, expected T ({self.T}) or T + 1")
        if a.min() < 0:  # +/-1 encoding: +1 -> 1, -1 -> 0
            a = (a > 0).astype(np.int64)
        return self.f(a[:, list(self.relevant)])

    def sample(self, n: int, stream: int = _STREAM_TRAIN, noise: Optional[float] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw ``n`` examples from one random stream: (token ids (n, T + 1) long, labels (n,) long)."""
        if n < 0:
            raise ConfigError(f"sample size must be >= 0 (got {n})")
        bits_rng, lab_rng, pat_rng, noise_rng = (_rng(self.seed, self.T, stream, k) for k in range(4))
        bits = bits_rng.integers(0, 2, size=(n, self.T), dtype=np.int64)
        if self.balanced:
            table = np.asarray(self.table)
            pats = np.array(list(itertools.product((0, 1), repeat=self.s)), dtype=np.int64)
            y = lab_rng.integers(0, 2, size=n)
            u = pat_rng.random(n)  # one draw per example keeps smaller samples prefixes of larger ones
            for cls in (0, 1):
                pool = pats[table == cls]
                idx = np.flatnonzero(y == cls)
                pick = np.minimum((u[idx] * len(pool)).astype(np.int64), len(pool) - 1)
                bits[np.ix_(idx, list(self.relevant))] = pool[pick]
        y = self.f(bits[:, list(self.relevant)])
        p = self.noise if noise is None else noise
        if p > 0:
            y = np.where(noise_rng.random(n) < p, 1 - y, y)
        ids = np.concatenate([np.full((n, 1), CLS_ID, dtype=np.int64), bits], axis=1)
        return torch.from_numpy(ids), torch.from_numpy(y.astype(np.int64))

    def split(self, n_train: int, n_test: int, n_val: int = 0) -> Split:
        """Train set of ``n_train`` (noisy labels if noise > 0), clean test (and validation) sets.

        Each split has its own stream, so the train set of size m is a prefix of the one of size 2m.
        """
        for flag, v in (("--m (train size)", n_train), ("--n-test", n_test)):
            if v <= 0:
                raise ConfigError(f"{flag} must be > 0 (got {v})")
        if n_val < 0:
            raise ConfigError(f"--n-val must be >= 0 (got {n_val})")
        tx, ty = self.sample(n_train, _STREAM_TRAIN)
        sx, sy = self.sample(n_test, _STREAM_TEST, noise=0.0)
        vx, vy = self.sample(n_val, _STREAM_VAL, noise=0.0) if n_val else (None, None)
        return Split(tx, ty, sx, sy, vx, vy)


def make_task(name: str, T: int, s: int, seed: int = 0, balanced: bool = True, noise: float = 0.0,
              flag: str = "--T") -> SparseBooleanTask:
    """Build a task; the hidden positions (and the random function's truth table) come from ``seed``."""
    name = name.lower()
    if name not in TASKS:
        raise ConfigError(f"--task must be one of {', '.join(TASKS)} (got {name!r})")
    if T < 1:
        raise ConfigError(f"{flag} must be >= 1 (got {T})")
    if s < 1:
        raise ConfigError(f"--s must be >= 1 (got {s})")
    if s > T:
        raise ConfigError(f"--s ({s}) must be <= {flag} ({T})")
    if s > MAX_S:
        raise ConfigError(f"--s ({s}) must be <= {MAX_S} (truth tables have 2**s rows)")
    if name == "majority" and s % 2 == 0:
        raise ConfigError(f"--s must be odd for --task majority (got {s}); ties have no label")
    if not 0.0 <= noise < 0.5:
        raise ConfigError(f"--noise must be in [0, 0.5) (got {noise})")
    rng = _rng(seed, T, _STREAM_TASK)
    relevant = tuple(sorted(int(i) for i in rng.choice(T, size=s, replace=False)))
    pats = np.array(list(itertools.product((0, 1), repeat=s)), dtype=np.int64)
    if name == "random":
        table = rng.integers(0, 2, size=len(pats))
        while table.min() == table.max():  # a constant function has no variables to find
            table = rng.integers(0, 2, size=len(pats))
    else:
        table = boolean_function(name, pats)
    return SparseBooleanTask(name, T, s, seed, relevant, tuple(int(v) for v in table), balanced, noise)
