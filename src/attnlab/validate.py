"""Reusable option validators: each raises ConfigError naming the flag. Used by config dataclasses
(``__post_init__``) and, through :data:`RULES` keyed by option name, by the CLI before a command does any work."""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

from .errors import ConfigError

MAX_SEED = 2**32 - 1


def flag_of(name: str) -> str:
    """'batch_size' -> '--batch-size' (names that already look like flags are kept)."""
    return name if name.startswith("-") else "--" + name.replace("_", "-")


def finite(value: Any, flag: str) -> float:
    """A finite real number (not NaN, not +-inf)."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{flag_of(flag)} {value!r}: expected a number") from None
    if not math.isfinite(v):
        raise ConfigError(f"{flag_of(flag)} {value}: must be a finite number")
    return v


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def in_range(value: Any, flag: str, lo: Optional[float] = None, hi: Optional[float] = None,
             lo_open: bool = False, hi_open: bool = False, hint: str = "") -> Any:
    """``value`` finite and within [lo, hi] (open ends with ``lo_open`` / ``hi_open``); returns it unchanged."""
    v = finite(value, flag)
    bad = (lo is not None and (v < lo or (lo_open and v == lo))) or (hi is not None and (v > hi or (hi_open and v == hi)))
    if bad:
        left = "" if lo is None else ("(" if lo_open else "[") + _num(lo)
        right = "" if hi is None else _num(hi) + (")" if hi_open else "]")
        want = (f"in {left}, {right}" if lo is not None and hi is not None
                else f"{'>' if lo_open else '>='} {_num(lo)}" if lo is not None else f"{'<' if hi_open else '<='} {_num(hi)}")
        raise ConfigError(f"{flag_of(flag)} must be {want} (got {value}){hint}")
    return value


def positive(value: Any, flag: str) -> Any:
    """> 0."""
    return in_range(value, flag, lo=0, lo_open=True)


def non_negative(value: Any, flag: str) -> Any:
    """>= 0."""
    return in_range(value, flag, lo=0)


def at_least(lo: float, hint: str = "") -> Callable[[Any, str], Any]:
    """A validator for ``>= lo``."""
    return lambda v, flag: in_range(v, flag, lo=lo, hint=hint)


def between(lo: float, hi: float, lo_open: bool = False, hi_open: bool = False) -> Callable[[Any, str], Any]:
    """A validator for a bounded interval."""
    return lambda v, flag: in_range(v, flag, lo, hi, lo_open, hi_open)


def device(value: Any, flag: str = "--device") -> Any:
    """cpu, auto, cuda or cuda:N (checked against this machine), mps (checked)."""
    text = str(value).strip().lower()
    if text in ("cpu", "auto"):
        return value
    import torch

    kind, _, idx = text.partition(":")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"{flag} {value}: CUDA is not available on this machine (use {flag} cpu)")
        if idx:
            if not idx.isdigit() or int(idx) >= torch.cuda.device_count():
                raise ConfigError(f"{flag} {value}: no such CUDA device ({torch.cuda.device_count()} visible)")
        return value
    if kind == "mps" and not idx:
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ConfigError(f"{flag} {value}: Apple MPS is not available on this machine (use {flag} cpu)")
        return value
    raise ConfigError(f"{flag} {value!r}: unknown device; use cpu, cuda or cuda:N")


def seed(value: Any, flag: str = "--seed") -> Any:
    """An integer seed in [0, 2**32 - 1] (what NumPy accepts)."""
    return in_range(value, flag, 0, MAX_SEED)


_POS_INT = at_least(1)
#: Largest training/test set the variables experiments accept (10^7 examples of T bits: gigabytes already).
MAX_EXAMPLES = 10_000_000
_EXAMPLES = between(1, MAX_EXAMPLES)
_NON_NEG = non_negative
# Option name -> validator, applied by the CLI to every command's options of that name (None = not given).
RULES: dict[str, Callable[[Any, str], Any]] = {
    **{name: _POS_INT for name in (
        "batch_size", "n_sequences", "n_fit", "n_eval", "rank", "epochs", "d_model", "n_heads", "n_layers",
        "vocab_size", "max_windows", "proxy_rank", "refresh", "seeds", "max_steps",
        "hf_seq_len", "head_chunk", "basis_k", "k", "s")},
    "seq_len": at_least(2, " (a window needs at least 2 tokens)"),
    **{name: _EXAMPLES for name in ("m", "m_min", "m_max", "n_test")},
    **{name: _NON_NEG for name in ("n_down", "hf_finetune_steps", "steps", "sketch_size", "ridge", "jitter",
                                   "weight_decay", "penalty", "budget_s")},
    "force_window": at_least(-1),
    "lr": positive,
    "alpha": lambda v, flag: in_range(v, flag, lo=1, lo_open=True,
                                      hint="; entmax needs alpha > 1 (1.5 = entmax15, 2 = sparsemax)"),
    "threshold": between(0, 1, lo_open=True),
    "share": between(0, 1, lo_open=True),
    "rtol": between(0, 1, hi_open=True),
    "noise": between(0, 0.5, hi_open=True),
    "mask_prob": between(0, 1, lo_open=True, hi_open=True),
    **{name: positive for name in ("qk_bound", "v_bound", "out_bound")},
    "seed": seed,
    "device": device,
}


# List option name -> validator of each item (list options are also checked for finite numbers and repeats).
LIST_RULES: dict[str, Callable[[Any, str], Any]] = {
    "frontier_budgets": between(0, 1, lo_open=True),
    "budgets": positive,
    "targets": between(0, 1, lo_open=True, hi_open=True),
    "seeds": seed,
    **{name: _NON_NEG for name in ("layers", "heads")},
    **{name: _POS_INT for name in ("frontier_ranks", "ranks", "T", "t_values")},
}


def check_list(name: str, values: Any, flag: Optional[str] = None) -> Any:
    """Every item of list option ``name``: a finite number if numeric, no item twice (a repeated seed or layer
    would be counted twice), and the item rule of :data:`LIST_RULES` (e.g. budgets in (0, 1])."""
    flag = flag or flag_of(name)
    rule = LIST_RULES.get(name)
    seen: set = set()
    for v in values:
        if isinstance(v, bool) and rule is not None:
            raise ConfigError(f"{flag} {v!r}: expected a number, not true/false")
        if isinstance(v, str) and v.strip().lower() in ("nan", "inf", "+inf", "-inf", "infinity", "-infinity"):
            raise ConfigError(f"{flag} {v}: must be a finite number")
        if isinstance(v, (int, float)):
            finite(v, flag)
            if rule is not None:
                rule(v, flag)
        key = v if not isinstance(v, float) or not v.is_integer() else int(v)
        if isinstance(key, (int, float, str)) and key in seen:
            raise ConfigError(f"{flag} lists {v} twice; give each value once")
        if isinstance(key, (int, float, str)):
            seen.add(key)
    return values


def check_option(name: str, value: Any, flag: Optional[str] = None) -> Any:
    """Apply the rule for option ``name`` (if any) to ``value``; floats must always be finite; a bool where a
    number is expected (TOML ``n_sequences = true``) is refused; lists go through :func:`check_list`."""
    if value is None:
        return value
    flag = flag or flag_of(name)
    if isinstance(value, (list, tuple)):
        return check_list(name, value, flag)
    rule = RULES.get(name)
    if isinstance(value, bool):
        if rule is not None and name != "device":
            raise ConfigError(f"{flag} {str(value).lower()}: expected a number, not true/false")
        return value
    if isinstance(value, float):
        finite(value, flag)
    if rule is not None:
        rule(value, flag)
    return value


MAX_RANGE = 65536  # longest 'a-b' range accepted in list options (more is a typo, and a huge list)


def total_memory() -> int:
    """Physical memory of this machine in bytes (0 if unknown)."""
    import os

    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0


def check_memory(nbytes: float, what: str, fix: str, limit: float | None = None) -> None:
    """Refuse up front a run whose estimated peak memory exceeds ``limit`` (default 80% of physical memory)."""
    limit = 0.8 * total_memory() if limit is None else limit
    if limit and nbytes > limit:
        raise ConfigError(f"{what} needs about {nbytes / 2**30:.1f} GiB (more than {limit / 2**30:.1f} GiB available); "
                          f"{fix}")


def attention_bytes(batch: int, heads: int, n: int, layers: int = 1, factor: float = 3.0) -> float:
    """Rough peak bytes of float32 attention scores (batch x heads x n^2 per layer, x factor for softmax/grad)."""
    return float(batch) * heads * n * n * 4 * layers * factor


def _fits(value: Any, hint: Any) -> bool:
    """Whether ``value`` has the annotated type (int, float, str, bool, Optional/Union, list/tuple of those)."""
    import types
    import typing

    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any or hint is None or isinstance(hint, (str, typing.TypeVar)):
        return True if hint is not None else value is None
    if hint is type(None):
        return value is None
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if origin is typing.Literal:
        return value in args
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False
        inner = [a for a in args if a is not Ellipsis]
        return not inner or all(_fits(v, inner[0]) for v in value)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    return True  # other types (tensors, models, ...) are checked where they are used


def _type_name(hint: Any) -> str:
    if isinstance(hint, type):
        return hint.__name__
    return str(hint).replace("typing.", "").replace("NoneType", "None")


def check_fields(obj: Any, skip: tuple[str, ...] = ()) -> None:
    """Apply :data:`RULES` to every field of a config dataclass that has a rule, after checking each value against
    its annotated type (library calls get the CLI's checks: ``seq_len=16.5`` or ``layers='0-2'`` are refused)."""
    import typing
    from dataclasses import fields

    try:
        hints = typing.get_type_hints(type(obj))
    except Exception:  # an annotation that does not resolve: skip the type check
        hints = {}
    for f in fields(obj):
        if f.name in skip:
            continue
        value = getattr(obj, f.name)
        hint = hints.get(f.name, Any)
        if isinstance(value, float) and hint is int and value.is_integer():
            value = int(value)  # TOML/JSON 16.0 for an int option
            object.__setattr__(obj, f.name, value)
        if not _fits(value, hint):
            raise ConfigError(f"{flag_of(f.name)} {value!r}: expected {_type_name(hint)}, got {type(value).__name__}"
                              + (" (give a list of ints, e.g. [0, 1, 2])" if "list" in _type_name(hint) else ""))
        check_option(f.name, value)
