"""Byte-level corpus: Python stdlib source files as documents, held-out split by document."""

from __future__ import annotations

import hashlib
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from ..errors import CorpusError

#: ByT5 byte ids: pad 0, eos 1, unk 2, byte b -> b + 3 (vocabulary 259).
OFFSET = 3
EOS_ID = 1
VOCAB = 259


def stdlib_dir() -> Path:
    """The running Python's standard-library source folder."""
    return Path(sysconfig.get_paths()["stdlib"])


def is_heldout(rel_path: str, frac: float) -> bool:
    """Deterministic document-level split: a file is held out iff the hash of its relative path says so."""
    h = int.from_bytes(hashlib.sha1(rel_path.encode()).digest()[:8], "little")
    return (h % 10_000) < frac * 10_000


def _files(root: Path) -> Iterator[Path]:
    """``*.py`` files under ``root`` in sorted order, skipping site-packages / dist-packages / __pycache__."""
    if root.is_file():
        yield root
        return
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "dist-packages", "__pycache__"))
        for f in sorted(filenames):
            if f.endswith(".py"):
                yield Path(dirpath) / f


def encode_bytes(data: bytes) -> np.ndarray:
    """Raw bytes -> ByT5 ids (uint16)."""
    return np.frombuffer(data, dtype=np.uint8).astype(np.uint16) + OFFSET


@dataclass
class ByteCorpus:
    """Train and held-out token streams (documents joined by EOS) with their document counts."""

    train: torch.Tensor  # int64 (T,)
    heldout: torch.Tensor  # int64 (V,)
    n_train_docs: int
    n_heldout_docs: int
    source: str

    def describe(self) -> dict:
        """JSON-friendly summary."""
        return {"source": self.source, "train_tokens": int(self.train.numel()), "heldout_tokens": int(self.heldout.numel()),
                "train_docs": self.n_train_docs, "heldout_docs": self.n_heldout_docs}


def load_corpus(root: str | Path | None = None, heldout_frac: float = 0.05, max_bytes: int | None = None,
                min_heldout_tokens: int = 0) -> ByteCorpus:
    """Read every ``*.py`` under ``root`` (default: the stdlib), split by document, encode as bytes.
    ``max_bytes`` caps the total read (tests); ``min_heldout_tokens`` moves extra documents to held-out until
    the held-out stream is that long (so long-context evaluation windows exist)."""
    if not 0.0 < heldout_frac < 1.0:
        raise CorpusError(f"--heldout-frac must be in (0, 1), got {heldout_frac}")
    base = Path(root) if root is not None else stdlib_dir()
    if not base.exists():
        raise CorpusError(f"--corpus {base}: no such file or folder")
    train, held, total, n_files = [], [], 0, 0
    for p in _files(base):
        n_files += 1
        try:
            data = p.read_bytes()
        except OSError:
            continue
        if not data:
            continue
        rel = str(p.relative_to(base)) if base.is_dir() else p.name
        (held if is_heldout(rel, heldout_frac) else train).append(data)
        total += len(data)
        if max_bytes is not None and total >= max_bytes:
            break
    if not n_files:
        raise CorpusError(f"--corpus {base}: no .py files found")
    while len(train) > 1 and (not held or sum(len(d) + 1 for d in held) < min_heldout_tokens):
        held.append(train.pop())
    if not train or not held:
        raise CorpusError(f"--corpus {base}: too little text for a train/held-out split ({total} bytes)")
    sep = b"\x00"  # placeholder byte, replaced by EOS below

    def stream(docs: list[bytes]) -> torch.Tensor:
        ids = encode_bytes(sep.join(docs) + sep).astype(np.int64)
        ids[ids == OFFSET] = EOS_ID  # NUL never occurs in source text: use it as the document separator
        return torch.from_numpy(ids)

    return ByteCorpus(stream(train), stream(held), len(train), len(held), str(base))


def windows(stream: torch.Tensor, seq_len: int, count: int, generator: torch.Generator | None = None,
            contiguous: bool = False) -> torch.Tensor:
    """``count`` windows (count, seq_len) from a stream: random starts, or evenly spaced with ``contiguous``."""
    n = stream.numel() - seq_len
    if n < 1:
        raise CorpusError(f"stream of {stream.numel()} tokens is shorter than --seq-len {seq_len}")
    if contiguous:
        starts = torch.linspace(0, n - 1, count).long() if count > 1 else torch.zeros(1, dtype=torch.long)
    else:
        starts = torch.randint(0, n, (count,), generator=generator)
    return torch.stack([stream[s: s + seq_len] for s in starts.tolist()])
