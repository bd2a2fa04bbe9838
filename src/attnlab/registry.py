"""Registries keyed by name: the one extension mechanism for predictors, selections and estimators.

A new method is one file plus one registration::

    from attnlab.sparsity.predictors import PREDICTORS

    @PREDICTORS.register("my-method", help="what it does")
    class MyPredictor: ...

``REGISTRY.get(name)`` returns the registered object; an unknown name raises a ``ConfigError`` that names
the flag and lists every registered choice, so the CLI never needs its own list of names.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Generic, Iterator, TypeVar

from .errors import ConfigError

T = TypeVar("T")


@dataclass
class Entry(Generic[T]):
    """One registered object with its name, one-line help and free-form tags (e.g. ``learned``)."""

    name: str
    obj: T
    help: str = ""
    tags: frozenset[str] = frozenset()


@dataclass
class Registry(Generic[T]):
    """Objects registered by name; ``flag`` is the CLI option that selects them (used in errors)."""

    kind: str
    flag: str
    _entries: dict[str, Entry[T]] = field(default_factory=dict)

    def register(self, name: str, help: str = "", tags: tuple[str, ...] = ()) -> Callable[[T], T]:
        """Decorator: register ``obj`` under ``name`` (a name may be registered once)."""

        def deco(obj: T) -> T:
            self.add(name, obj, help=help, tags=tags)
            return obj

        return deco

    def add(self, name: str, obj: T, help: str = "", tags: tuple[str, ...] = ()) -> None:
        """Register ``obj`` under ``name``; re-registering a name with another object is an error."""
        if name in self._entries and self._entries[name].obj is not obj:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._entries[name] = Entry(name, obj, help, frozenset(tags))

    def get(self, name: str) -> T:
        """The object registered as ``name``; an unknown name is a ConfigError naming the flag and choices."""
        try:
            return self._entries[name].obj
        except KeyError:
            raise ConfigError(f"{self.flag}: unknown {self.kind} {name!r}; choose from {', '.join(self.names())}") from None

    def entry(self, name: str) -> Entry[T]:
        """The full entry (help, tags) for ``name``."""
        self.get(name)
        return self._entries[name]

    def names(self, tag: str | None = None) -> list[str]:
        """Registered names in registration order, optionally only those carrying ``tag``."""
        return [n for n, e in self._entries.items() if tag is None or tag in e.tags]

    def remove(self, name: str) -> None:
        """Unregister ``name`` (tests that register toy methods clean up with this)."""
        self._entries.pop(name, None)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def describe(self) -> dict[str, Any]:
        """Name -> help, for ``--help`` texts and the report."""
        return {n: e.help for n, e in self._entries.items()}
