"""Text corpora: files, directories, JSON lines, or the default (Python stdlib docstrings), cut into
fixed-length token windows with a deterministic fit / held-out split.

A *document* is a blank-line separated paragraph of a text file (line ends LF, CRLF or CR alike), one non-empty
JSON-lines record, or one docstring. ``--corpus stdlib`` (or no --corpus) means the Python stdlib docstrings; when
a file or folder named ``stdlib`` also exists in the working directory, an explicit ``stdlib`` is refused as
ambiguous (give ``./stdlib`` for the folder, or leave --corpus out for the docstrings).
Split rule: when the corpus has at least ``MIN_SPLIT_DOCS`` documents on each side of a stable hash of their
text (20% held out), fit and held-out windows come from different documents. A smaller corpus is split by
windows instead: all documents are cut into windows in order and the last 20% of the windows (at least one)
are held out, so the two splits never share tokens but may share a document. Fewer than 2 windows is an error.
"""

from __future__ import annotations

import ast
import hashlib
import json
import logging
import math
import os
import stat
import sysconfig
from pathlib import Path
from typing import Iterator, Optional

import torch

from ..errors import ConfigError, CorpusError

DEFAULT_CORPUS = "stdlib"
TEXT_SUFFIXES = {".txt", ".md", ".rst", ".text", ""}
JSONL_SUFFIXES = {".jsonl", ".json", ".ndjson"}
_MIN_DOC_WORDS = 8
MIN_SPLIT_DOCS = 4  # documents per side needed for the document-level split (else split by windows)
MIN_EVAL_WINDOWS = 2  # held-out windows needed for a mean with a spread
HELDOUT_FRACTION = 0.2
log = logging.getLogger("attnlab")


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
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CorpusError(f"--corpus {path}: cannot read ({e.strerror or e}); fix its permissions or remove it") from e
    if b"\x00" in data[:8192]:
        raise CorpusError(f"--corpus {path}: looks like a binary file (NUL bytes); give a UTF-8 text file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CorpusError(f"--corpus {path}: not valid UTF-8 text ({e})") from e
    return text.replace("\r\n", "\n").replace("\r", "\n")  # CRLF / CR files split like LF ones


def _read_jsonl(path: Path, text_field: str) -> Iterator[str]:
    for lineno, line in enumerate(_read_text_file(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise CorpusError(f"--corpus {path}:{lineno}: invalid JSON line ({e})") from e
        if isinstance(obj, str) or (isinstance(obj, dict) and isinstance(obj.get(text_field), str)):
            text = obj if isinstance(obj, str) else obj[text_field]
            if text.strip():  # an empty record is not a document (it would give windows of separators)
                yield text
        else:
            keys = ", ".join(repr(k) for k in obj) if isinstance(obj, dict) else type(obj).__name__
            raise CorpusError(f"--corpus {path}:{lineno}: no string field {text_field!r} (this record has {keys}); "
                              f"set --text-field (spectrum, capture)")


def corpus_files(path: Path) -> list[Path]:
    """The files of a corpus path: itself (a regular file), or a directory's regular files in sorted order,
    skipping hidden files and directories (.git/, .DS_Store) and files that are neither text nor JSON lines."""
    try:
        mode = path.stat().st_mode
    except OSError as e:
        raise CorpusError(f"--corpus {path}: cannot access ({e.strerror or e})") from e
    if stat.S_ISDIR(mode):
        files = []
        for root, dirs, names in os.walk(path):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for n in sorted(names):
                f = Path(root) / n
                if n.startswith(".") or not f.is_file():  # hidden, FIFO, socket, device, broken link
                    continue
                if f.suffix.lower() in JSONL_SUFFIXES or f.suffix.lower() in TEXT_SUFFIXES:
                    files.append(f)
        if not files:
            raise CorpusError(f"--corpus {path}: no .txt/.md/.rst/.jsonl files (hidden files are skipped)")
        return files
    if not stat.S_ISREG(mode):
        raise CorpusError(f"--corpus {path}: not a regular file or directory (a FIFO, socket or device?); "
                          "give a text file, .jsonl file or directory")
    return [path]


def iter_documents(source: Optional[str | Path] = None, text_field: str = "text") -> Iterator[str]:
    """Yield documents from ``source``: None/'stdlib', a text file, a .jsonl file or a directory of them."""
    if is_stdlib(source):
        yield from stdlib_docstrings()
        return
    path = Path(source)
    if not path.exists():
        raise CorpusError(f"--corpus {path}: no such file or directory")
    in_dir = path.is_dir()
    for f in corpus_files(path):
        if f.suffix.lower() in JSONL_SUFFIXES:
            yield from _read_jsonl(f, text_field)
        else:
            try:
                text = _read_text_file(f)
            except CorpusError as e:
                if not (in_dir and f.suffix == "" and "cannot read" not in str(e)):
                    raise
                log.warning("skipping %s: extensionless file that is not UTF-8 text", f)
                continue
            # Paragraphs (blank-line separated) are documents.
            yield from (p for p in text.split("\n\n") if p.strip())


def is_stdlib(source: Optional[str | Path]) -> bool:
    """True for the built-in stdlib-docstring corpus (None or the string 'stdlib'); CorpusError when 'stdlib'
    also names an existing path (the two readings would give different experiments)."""
    if source is None:
        return True
    if isinstance(source, Path) or str(source) != DEFAULT_CORPUS:
        return False
    if os.path.lexists(DEFAULT_CORPUS):
        here = Path(DEFAULT_CORPUS).resolve()
        raise CorpusError(f"--corpus stdlib is ambiguous: it names the built-in corpus of Python stdlib docstrings and "
                          f"the existing path {here}; give --corpus ./stdlib for that path, or leave --corpus out for "
                          f"the docstrings")
    return True


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


def split_rule(source: Optional[str | Path] = None, heldout_fraction: float = HELDOUT_FRACTION,
               text_field: str = "text") -> str:
    """'documents' when each side of the hash split has >= MIN_SPLIT_DOCS documents, else 'windows'."""
    if is_stdlib(source):
        return "documents"
    n = [0, 0]
    for doc in iter_documents(source, text_field):
        n[is_heldout(doc, heldout_fraction)] += 1
        if min(n) >= MIN_SPLIT_DOCS:
            return "documents"
    return "windows"


def _cut(tokenizer, docs, seq_len: int, max_windows: Optional[int]) -> tuple[list[list[int]], int]:
    """Concatenate tokenised documents (separated by [SEP]/EOS) and cut windows with the special tokens."""
    prefix, suffix = special_tokens(tokenizer)
    body = seq_len - len(prefix) - len(suffix)
    if body < 1:
        raise ConfigError(f"--seq-len {seq_len} leaves no room for text after {len(prefix) + len(suffix)} special tokens")
    sep = [tokenizer.sep_token_id] if getattr(tokenizer, "sep_token_id", None) is not None else (
        [tokenizer.eos_token_id] if getattr(tokenizer, "eos_token_id", None) is not None else [])
    windows: list[list[int]] = []
    buf: list[int] = []
    for doc in docs:
        ids = tokenizer(doc, add_special_tokens=False, verbose=False)["input_ids"]
        if not ids:
            continue
        buf.extend(ids + sep)
        start = 0  # cut by offset, then drop the used head once: linear in the document length
        while len(buf) - start >= body:
            windows.append(prefix + buf[start:start + body] + suffix)
            start += body
            if max_windows is not None and len(windows) >= max_windows:
                return windows, len(buf) - start
        del buf[:start]
    return windows, len(buf)


def token_windows(
    tokenizer, seq_len: int, source: Optional[str | Path] = None, max_windows: Optional[int] = None,
    split: str = "all", heldout_fraction: float = HELDOUT_FRACTION, text_field: str = "text",
) -> torch.Tensor:
    """Tokenise documents, concatenate them and cut into (M, seq_len) windows with the model's special tokens.

    ``split`` is 'fit', 'heldout' or 'all'; fit and held-out windows never share tokens (see the module's split
    rule: by document when the corpus has enough documents, else by windows).
    """
    if split not in ("fit", "heldout", "all"):
        raise ConfigError(f"split must be fit, heldout or all (got {split!r})")
    if seq_len < 2:
        raise ConfigError(f"--seq-len must be >= 2 (got {seq_len})")
    name = source or DEFAULT_CORPUS
    rule = "documents" if split == "all" else split_rule(source, heldout_fraction, text_field)
    if rule == "windows":
        windows, _ = _cut(tokenizer, iter_documents(source, text_field), seq_len, None)
        if len(windows) < 2:
            raise CorpusError(
                f"--corpus {name}: gives {len(windows)} window(s) of --seq-len {seq_len}; a fit / held-out split needs "
                f"at least 2 (give more text or a smaller --seq-len)")
        n_held = max(1, math.floor(heldout_fraction * len(windows)))
        log.warning("corpus %s has fewer than %d documents on each side of the document split (a document is a "
                    "paragraph of a text file or a JSON-lines record); splitting by windows instead: the last %d of %d "
                    "windows are held out", name, MIN_SPLIT_DOCS, n_held, len(windows))
        windows = windows[len(windows) - n_held:] if split == "heldout" else windows[:len(windows) - n_held]
        return torch.tensor(windows[:max_windows] if max_windows else windows, dtype=torch.long)
    n_docs = [0]

    def docs():
        for doc in iter_documents(source, text_field):
            if split == "all" or is_heldout(doc, heldout_fraction) == (split == "heldout"):
                n_docs[0] += 1
                yield doc

    windows, left = _cut(tokenizer, docs(), seq_len, max_windows)
    if n_docs[0] == 0:
        raise CorpusError(f"--corpus {name}: empty (no documents in split {split!r}; a document is a paragraph of a "
                          f"text file or a JSON-lines record, split by a hash of its text)")
    if not windows:
        raise CorpusError(
            f"--corpus {name}: only {left} tokens in split {split!r} ({n_docs[0]} documents), shorter than one "
            f"sequence of --seq-len {seq_len}; give more text or a smaller --seq-len")
    return torch.tensor(windows, dtype=torch.long)


def check_windows(windows: torch.Tensor, asked: int, flag: str, split: str = "fit",
                  minimum: int = 1) -> torch.Tensor:
    """Warn when fewer windows than ``asked`` are available; raise CorpusError below ``minimum``."""
    got = len(windows)
    if got < minimum:
        raise CorpusError(f"{flag} {asked}: only {got} window(s) in the {split!r} split, at least {minimum} needed "
                          f"(a mean with a spread); give more text or a smaller --seq-len")
    if got < asked:
        log.warning("%s %d asked, but the %r split has only %d window(s): using %d", flag, asked, split, got, got)
    return windows


def select_windows(tokenizer, seq_len: int, corpus: Optional[str], n: int, split: str = "fit", seed: int = 0,
                   text_field: str = "text", flag: str = "--n-sequences", minimum: int = 1) -> torch.Tensor:
    """``n`` windows drawn with ``seed`` from a pool of 4n windows of the corpus split (deterministic).

    Warns when the split has fewer than ``n`` windows; raises CorpusError below ``minimum``."""
    pool = token_windows(tokenizer, seq_len, corpus, max_windows=4 * n, split=split, text_field=text_field)
    check_windows(pool, n, flag, split, minimum)
    if len(pool) <= n:
        return pool
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(pool), generator=g)[:n].sort().values
    return pool[idx]
