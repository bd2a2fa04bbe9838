"""Configuration precedence: CLI flags > --config TOML file > defaults."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any, Mapping

from .errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def read_toml(path: str | Path) -> dict[str, Any]:
    """Parse a TOML file, with errors naming --config."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--config {p}: no such file")
    try:
        return tomllib.loads(p.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"--config {p}: invalid TOML ({e})") from e


def merge(defaults: Mapping[str, Any], file_values: Mapping[str, Any], cli_values: Mapping[str, Any]) -> dict[str, Any]:
    """Defaults, overridden by the file, overridden by CLI values that were given (not None)."""
    unknown = set(file_values) - set(defaults)
    if unknown:
        raise ConfigError(f"--config: unknown keys {sorted(unknown)}; known: {sorted(defaults)}")
    out = dict(defaults)
    out.update(file_values)
    out.update({k: v for k, v in cli_values.items() if v is not None})
    return out


def fingerprint(config: Mapping[str, Any], ignore: tuple[str, ...] = ("resume", "progress", "out")) -> str:
    """Stable hash of the settings that change results (used to refuse resuming a different run)."""
    clean = {k: v for k, v in config.items() if k not in ignore}
    return hashlib.sha256(json.dumps(clean, sort_keys=True, default=str).encode()).hexdigest()[:16]
