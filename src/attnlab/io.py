"""Run directories: atomic JSON and safetensors writes, checked reads, resumable progress."""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
import signal
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional

import torch
from safetensors.torch import load_file, save_file

from .errors import ConfigError, ResultsError

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


def public_mode(path: str | os.PathLike) -> None:
    """Give a fresh temp file the permissions of an ordinary new file (0666 minus the umask) before publishing it."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


@contextlib.contextmanager
def public_writes(folder: str | os.PathLike) -> Iterator[Path]:
    """Around a third-party writer (``save_pretrained`` writes 0600 files): each file of ``folder`` it creates or
    replaces gets the mode of an ordinary new file (0666 minus the umask)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    files = lambda: {e.name: (e.inode(), e.stat().st_mtime_ns) for e in os.scandir(folder)
                     if e.is_file(follow_symlinks=False)}  # noqa: E731
    before = files()
    yield folder
    for name in [n for n, sig in files().items() if before.get(n) != sig]:
        public_mode(folder / name)


def os_error(e: OSError, path: str | os.PathLike, action: str = "write") -> ResultsError:
    """A one-line ResultsError for a failed write (disk full, read-only, permission) naming the path."""
    why = {errno.ENOSPC: "disk full", errno.EDQUOT: "disk quota exceeded", errno.EROFS: "read-only file system",
           errno.EACCES: "permission denied", errno.EPERM: "permission denied"}.get(e.errno, e.strerror or str(e))
    hint = "; free some space and re-run with --resume (files written so far are intact)" if e.errno in (
        errno.ENOSPC, errno.EDQUOT) else "; choose another --out"
    return ResultsError(f"cannot {action} {path}: {why}{hint}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temp path next to ``path``; on success it replaces ``path`` (umask-respecting mode), else it is removed."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
        os.close(fd)
    except OSError as e:
        raise os_error(e, path) from e
    try:
        yield Path(tmp)
        public_mode(tmp)
        os.replace(tmp, path)
    except OSError as e:
        raise os_error(e, path) from e
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())


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
        raise ResultsError(f"{path}: corrupt or truncated JSON ({e}); delete it (it cannot be read) or choose "
                          "another --out") from e


def write_tensors(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any] | None = None) -> Path:
    """Save tensors as safetensors atomically; ``meta`` is stored as JSON in the header."""
    path = Path(path)
    clean = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(clean, str(tmp), metadata={"attnlab": json.dumps(_jsonable(meta or {}))})
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


LOCK_FILE = ".attnlab.lock"
_HELD: dict[str, list] = {}  # real path of a lock file -> [fd, depth] (re-entrant within one process)
_CHECKPOINTS = 0


def check_name_lengths(p: Path, flag: str = "--out") -> None:
    """Refuse a path with a component longer than the file system allows (else ENAMETOOLONG later)."""
    try:
        limit = os.pathconf(next((a for a in [p, *p.parents] if a.exists()), Path(".")), "PC_NAME_MAX")
    except (OSError, ValueError):
        limit = 255
    for part in p.parts:
        if len(os.fsencode(part)) > limit:
            raise ConfigError(f"{flag} {str(p)[:60]}...: the name {part[:24]}... is {len(os.fsencode(part))} bytes long, "
                              f"over the file system's {limit}; choose a shorter {flag}")


def check_out(path: str | os.PathLike | None, flag: str = "--out", kind: str = "dir") -> Path:
    """Check (and create) an output location before any work: not empty, right kind, writable. Returns it."""
    raw = "" if path is None else os.fspath(path)
    if not str(raw).strip():
        raise ConfigError(f"{flag} is empty; give a {'run directory' if kind == 'dir' else 'file path'}")
    p = Path(raw)
    check_name_lengths(p, flag)
    if kind == "dir" and p.exists() and not p.is_dir():
        raise ConfigError(f"{flag} {p}: exists and is not a directory; give a run directory")
    if kind == "file" and p.is_dir():
        raise ConfigError(f"{flag} {p}: is a directory; give a file path, e.g. {p / 'model.safetensors'}")
    target = p if kind == "dir" else p.parent
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise os_error(e, target, "create") from e
    if not os.access(target, os.W_OK | os.X_OK):
        raise ResultsError(f"{flag} {p}: {target} is not writable; choose another {flag}")
    return p


@contextlib.contextmanager
def lock_output(path: str | os.PathLike, flag: str = "--out", kind: str = "dir",
                inside: Optional[str] = None) -> Iterator[Path]:
    """Hold an exclusive lock on an output directory (or file) so that two runs cannot mix their files.

    First the file the command writes (a file output, or ``inside`` a run directory) must not be foreign.
    The lock is ``fcntl.flock`` on ``.attnlab.lock`` (``.<name>.lock`` next to a file output); the kernel releases
    it when the process ends, even on SIGKILL. Re-entrant within one process. Raises ResultsError if busy.
    """
    import fcntl

    target = Path(os.fspath(path)) if kind == "dir" else Path(os.fspath(path)).parent
    fresh = None  # the topmost folder this call creates (removed again if the command fails with nothing in it)
    if str(os.fspath(path)).strip():
        for d in [target, *target.absolute().parents]:
            if d.exists():
                break
            fresh = d
    p = check_out(path, flag, kind)
    if kind == "file" or inside:  # the one place every command's output file is checked before any work
        check_foreign_file(p if kind == "file" else p / inside, flag)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and int(os.environ.get("RANK", "0")) != 0:
        yield p  # under torchrun rank 0 holds the lock for the whole job (the other ranks do not write)
        return
    lock = p / LOCK_FILE if kind == "dir" else p.parent / f".{p.name}.lock"
    key = os.path.realpath(lock)
    if key in _HELD:
        _HELD[key][1] += 1
        try:
            yield p
        finally:
            _HELD[key][1] -= 1
        return
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
        raise os_error(e, lock, "create lock file") from e
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        pid = os.read(fd, 32).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise ResultsError(f"{flag} {p} is in use by another attnlab run (pid {pid}); wait for it to finish or "
                           f"choose another {flag}") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    _HELD[key] = [fd, 1]
    failed = True
    try:
        yield p
        failed = False
    finally:
        if failed and fresh is not None:
            _remove_if_only_lock(target, lock, fresh)
        del _HELD[key]
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _remove_if_only_lock(folder: Path, lock: Path, top: Path) -> None:
    """A refused or failed command that created ``folder`` (and its parents up to ``top``) leaves nothing behind
    when only its lock is there."""
    try:
        if {e.name for e in os.scandir(folder)} <= {lock.name}:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(lock)
            d = folder.absolute()
            while True:
                d.rmdir()  # OSError when not empty: stop
                if d == top.absolute():
                    break
                d = d.parent
    except OSError:
        pass


OUTPUT_MARK = "attnlab_output"  # top-level key of a JSON file an attnlab command wrote as its --out file
RUN_FILES = (RESULTS, CONFIG, TIMINGS)


def check_foreign_file(path: Path, flag: str = "--out") -> None:
    """Refuse, before any work, to replace an existing file that attnlab did not write as a command's output:
    a run directory's results/config/timings, a safetensors file without attnlab metadata, a JSON file without
    the ``attnlab_output`` mark, or anything else."""
    if not path.exists():
        return
    why = None
    if path.name in RUN_FILES:
        why = "it belongs to a run directory"
    elif path.suffix == ".safetensors":
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as fh:
                if "attnlab" not in (fh.metadata() or {}):
                    why = "it is a safetensors file attnlab did not write"
        except Exception:
            why = "it is not a readable safetensors file"
    elif path.suffix == ".json":
        try:
            if OUTPUT_MARK not in json.loads(path.read_text()):
                why = "it is a JSON file attnlab did not write"
        except (ValueError, UnicodeDecodeError, TypeError):
            why = "it is not an attnlab JSON output"
    else:
        why = "attnlab did not write it"
    if why:
        raise ResultsError(f"{flag} {path}: exists and {why}; refusing to overwrite it -- choose another {flag} or "
                           "move the file away")


def checkpoint_written() -> None:
    """Call after each resumable checkpoint. Test hook: ``ATTNLAB_TEST_KILL_AFTER_CHECKPOINT=N`` makes the process
    send itself ``ATTNLAB_TEST_KILL_SIGNAL`` (KILL, INT or TERM; default KILL) right after its N-th checkpoint."""
    global _CHECKPOINTS
    n = os.environ.get("ATTNLAB_TEST_KILL_AFTER_CHECKPOINT")
    if not n:
        return
    _CHECKPOINTS += 1
    if _CHECKPOINTS == int(n):
        sig = getattr(signal, "SIG" + os.environ.get("ATTNLAB_TEST_KILL_SIGNAL", "KILL").upper())
        os.kill(os.getpid(), sig)


class RunDir:
    """A run directory: ``config.json``, ``results.json`` (one section per analysis), tensors, plots."""

    def __init__(self, path: str | os.PathLike, create: bool = True):
        if create:
            self.path = check_out(path)
        elif not str(os.fspath(path)).strip():
            raise ConfigError("run directory path is empty")
        else:
            self.path = Path(path)
        if not self.path.is_dir():
            raise ResultsError(f"{self.path}: run directory does not exist")
        if create:  # a damaged run file fails now, before any work, not after it (the work would be lost)
            for name in (CONFIG, RESULTS, TIMINGS):
                data = self._read(name)
                if not isinstance(data, dict):
                    raise ResultsError(f"{self.file(name)}: not an attnlab run file (a JSON object is expected); "
                                       "delete it or choose another --out")

    def config(self) -> dict[str, Any]:
        """config.json: the settings of each command that wrote into this run (empty if none)."""
        return self._read(CONFIG)

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
