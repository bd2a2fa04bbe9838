"""Text corpora: files, directories, JSON lines, or the default (Python stdlib docstrings), cut into
fixed-length token windows with a deterministic fit / held-out split by document."""

from __future__ import annotations

import ast
import hashlib
import json
import sysconfig
from pathlib import Path
from typing import Iterator, Optional

import torch

from ..errors import ConfigError, CorpusError

DEFAULT_CORPUS = "stdlib"
TEXT_SUFFIXES = {".txt", ".md", ".rst", ".text", ""}
_MIN_DOC_WORDS = 8


def stdlib_docstrings(min_words: int = _MIN_DOC_WORDS) -> Iterator[str]:
    """Yield docstrings of the Python standard library, parsed (never imported) in a fixed order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idlelib", "site-packages", "dist-packages", "lib2to3", "turtledemo"}
    for path in sorted(root.rglob("*.py")):
        if skip & set(path.relative_to(root).parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc.split()) >= min_words:
                    yield doc


def _read_text_file(path: Path) -> str:
    data = path.read_bytes()
    if b"\x00" in data[:8192]:
        raise CorpusError(f"--corpus {path}: looks like a binary file (NUL bytes); give a UTF-8 text file")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CorpusError(f"--corpus {path}: not valid UTF-8 text ({e})") from e


def _read_jsonl(path: Path, text_field: str) -> Iterator[str]:
    for lineno, line in enumerate(_read_text_file(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise CorpusError(f"--corpus {path}:{lineno}: invalid JSON line ({e})") from e
        if isinstance(obj, str):
            yield obj
        elif isinstance(obj, dict) and isinstance(obj.get(text_field), str):
            yield obj[text_field]
        else:
            raise CorpusError(f"--corpus {path}:{lineno}: no string field {text_field!r} (set --text-field)")


def iter_documents(source: Optional[str | Path] = None, text_field: str = "text") -> Iterator[str]:
    """Yield documents from ``source``: None/'stdlib', a text file, a .jsonl file or a directory of them."""
    if source is None or str(source) == DEFAULT_CORPUS:
        yield from stdlib_docstrings()
        return
    path = Path(source)
    if not path.exists():
        raise CorpusError(f"--corpus {path}: no such file or directory")
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        if f.suffix in (".jsonl", ".json"):
            yield from _read_jsonl(f, text_field)
        elif f.suffix.lower() in TEXT_SUFFIXES or not path.is_dir():
            text = _read_text_file(f)
            # Paragraphs (blank-line separated) are documents.
            yield from (p for p in text.split("\n\n") if p.strip())


def is_heldout(doc: str, heldout_fraction: float) -> bool:
    """Deterministic document-level split: a stable hash of the text picks the held-out share."""
    h = int.from_bytes(hashlib.blake2b(doc.encode(), digest_size=8).digest(), "little")
    return (h % 10_000) < heldout_fraction * 10_000


def special_tokens(tokenizer) -> tuple[list[int], list[int]]:
    """The special token ids the tokenizer puts before and after a single text (e.g. [CLS] / [SEP])."""
    plain = tokenizer("hello", add_special_tokens=False)["input_ids"]
    full = tokenizer("hello")["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            return full[:start], full[start + len(plain):]
    return [], []


def token_windows(
    tokenizer, seq_len: int, source: Optional[str | Path] = None, max_windows: Optional[int] = None,
    split: str = "all", heldout_fraction: float = 0.2, text_field: str = "text",
) -> torch.Tensor:
    """Tokenise documents, concatenate them and cut into (M, seq_len) windows with the model's special tokens.

    ``split`` is 'fit', 'heldout' or 'all'; fit and held-out windows never share a document.
    """
    if split not in ("fit", "heldout", "all"):
        raise ConfigError(f"split must be fit, heldout or all (got {split!r})")
    if seq_len < 2:
        raise ConfigError(f"--seq-len must be >= 2 (got {seq_len})")
    prefix, suffix = special_tokens(tokenizer)
    n_special = len(prefix) + len(suffix)
    body = seq_len - n_special
    if body < 1:
        raise ConfigError(f"--seq-len {seq_len} leaves no room for text after {n_special} special tokens")
    sep = [tokenizer.sep_token_id] if getattr(tokenizer, "sep_token_id", None) is not None else (
        [tokenizer.eos_token_id] if getattr(tokenizer, "eos_token_id", None) is not None else [])
    windows: list[list[int]] = []
    buf: list[int] = []
    n_docs = 0
    for doc in iter_documents(source, text_field):
        if split != "all" and is_heldout(doc, heldout_fraction) != (split == "heldout"):
            continue
        n_docs += 1
        buf.extend(tokenizer(doc, add_special_tokens=False, verbose=False)["input_ids"] + sep)
        while len(buf) >= body:
            windows.append(prefix + buf[:body] + suffix)
            buf = buf[body:]
            if max_windows is not None and len(windows) >= max_windows:
                return torch.tensor(windows, dtype=torch.long)
    if n_docs == 0:
        raise CorpusError(f"--corpus {source or DEFAULT_CORPUS}: empty (no documents in split {split!r})")
    if not windows:
        raise CorpusError(
            f"--corpus {source or DEFAULT_CORPUS}: only {len(buf)} tokens in split {split!r}, shorter than one "
            f"sequence of --seq-len {seq_len}; give more text or a smaller --seq-len")
    return torch.tensor(windows, dtype=torch.long)


def select_windows(tokenizer, seq_len: int, corpus: Optional[str], n: int, split: str = "fit", seed: int = 0,
                   text_field: str = "text") -> torch.Tensor:
    """``n`` windows drawn with ``seed`` from a pool of 4n windows of the corpus split (deterministic)."""
    pool = token_windows(tokenizer, seq_len, corpus, max_windows=4 * n, split=split, text_field=text_field)
    if len(pool) <= n:
        return pool
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(pool), generator=g)[:n].sort().values
    return pool[idx]
