"""Run directories: atomic JSON and safetensors writes, checked reads, resumable progress."""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import load_file, save_file

from .errors import ResultsError

RESULTS = "results.json"
CONFIG = "config.json"
TIMINGS = "timings.json"
# Wall-clock keys are kept out of results.json (so that the same seed gives a byte-identical file) and stored
# at the same place in timings.json; RunDir.results() merges them back for readers.
_TIMING_KEY = re.compile(r"(^|_)seconds$|^wall_s$")


def split_timings(obj: Any) -> tuple[Any, Any]:
    """Split ``obj`` into (the same without timing keys, the timing keys alone in the same nesting)."""
    if isinstance(obj, Mapping):
        clean, timings = {}, {}
        for k, v in obj.items():
            if isinstance(k, str) and _TIMING_KEY.search(k) and isinstance(v, (int, float)):
                timings[k] = v
                continue
            clean[k], sub = split_timings(v)
            if sub:
                timings[k] = sub
        return clean, timings
    if isinstance(obj, (list, tuple)):
        pairs = [split_timings(v) for v in obj]
        timings = {str(i): t for i, (_, t) in enumerate(pairs) if t}
        return [c for c, _ in pairs], timings
    return obj, {}


def merge_timings(obj: Any, timings: Any) -> Any:
    """Inverse of :func:`split_timings`."""
    if not timings:
        return obj
    if isinstance(obj, dict):
        out = dict(obj)
        for k, t in timings.items():
            out[k] = merge_timings(out[k], t) if k in out and isinstance(t, dict) else t
        return out
    if isinstance(obj, list):
        return [merge_timings(v, timings.get(str(i))) for i, v in enumerate(obj)]
    return obj


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return _jsonable(obj.detach().cpu().tolist())
    if hasattr(obj, "tolist"):  # numpy arrays and scalars
        return _jsonable(obj.tolist())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as JSON atomically (temp file + rename); NaN becomes null."""
    path = Path(path)
    text = json.dumps(_jsonable(obj), indent=2, sort_keys=True, allow_nan=False)
    _atomic_write_bytes(path, (text + "\n").encode())
    return path


def read_json(path: str | os.PathLike) -> Any:
    """Read JSON, raising ``ResultsError`` naming the file if it is missing or corrupt."""
    path = Path(path)
    if not path.is_file():
        raise ResultsError(f"{path}: no such results file")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ResultsError(f"{path}: corrupt or truncated JSON ({e}); delete it or re-run without --resume") from e


def write_tensors(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any] | None = None) -> Path:
    """Save tensors as safetensors atomically; ``meta`` is stored as JSON in the header."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        clean = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        save_file(clean, tmp, metadata={"attnlab": json.dumps(_jsonable(meta or {}))})
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def read_tensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load a safetensors file and its attnlab metadata, with a clear error when corrupt."""
    path = Path(path)
    if not path.is_file():
        raise ResultsError(f"{path}: no such tensor file")
    try:
        tensors = load_file(str(path))
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            header = fh.metadata() or {}
        meta = json.loads(header.get("attnlab", "{}"))
    except Exception as e:  # safetensors raises several private error types
        raise ResultsError(f"{path}: corrupt or truncated safetensors file ({e})") from e
    return tensors, meta


class RunDir:
    """A run directory: ``config.json``, ``results.json`` (one section per analysis), tensors, plots."""

    def __init__(self, path: str | os.PathLike, create: bool = True):
        self.path = Path(path)
        if create:
            self.path.mkdir(parents=True, exist_ok=True)
        elif not self.path.is_dir():
            raise ResultsError(f"{self.path}: run directory does not exist")

    def file(self, name: str) -> Path:
        """Path of a file inside the run directory."""
        return self.path / name

    def _read(self, name: str) -> dict[str, Any]:
        p = self.file(name)
        return read_json(p) if p.exists() else {}

    def results(self) -> dict[str, Any]:
        """All sections written so far, with their timings merged back in (empty if none)."""
        return merge_timings(self._read(RESULTS), self._read(TIMINGS))

    def section(self, name: str) -> dict[str, Any] | None:
        """One results section, or None."""
        return self.results().get(name)

    def write_section(self, name: str, data: Mapping[str, Any]) -> None:
        """Add or replace one section of results.json atomically (its timings go to timings.json)."""
        clean, timings = split_timings(dict(data))
        res = self._read(RESULTS)
        res[name] = clean
        all_timings = self._read(TIMINGS)
        all_timings[name] = timings
        write_json(self.file(TIMINGS), all_timings)
        write_json(self.file(RESULTS), res)

    def write_config(self, name: str, config: Mapping[str, Any]) -> None:
        """Record the configuration of one command (merged into config.json)."""
        p = self.file(CONFIG)
        cfg = read_json(p) if p.exists() else {}
        cfg[name] = config
        write_json(p, cfg)
