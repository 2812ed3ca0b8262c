"""One name -> object registry for every plugin kind (strategies, eval types, scenarios).

Each kind used to keep its own dict, decorator, discovery loop and "unknown ..." message, and they
drifted apart. A ``Registry`` gives them one behaviour: a ``register(name)`` decorator that refuses a
second object under a taken name, lazy discovery of the package that holds the plugins (so adding one
is one new file and no edit elsewhere, and the registry's module never imports its plugins at import
time, which would be an import cycle), and one error for a mistyped name that suggests the closest
registered one.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Iterable, Iterator
from typing import Generic, TypeVar

from retain.config import closest_name
from retain.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """Objects of one ``kind`` by name, filled by ``@register(name)`` in the modules of ``package``.

    ``package`` (a dotted name, e.g. ``"retain.strategies"``) is imported by name on the first read,
    then each of its modules whose name does not start with ``_`` and is not in ``exclude``: importing
    a module runs its decorators. ``validate(name, obj)`` runs once per new registration, before the
    object is stored, to refuse (raise) or adapt it. ``listing`` starts the list of registered names in
    the unknown-name error.
    """

    def __init__(
        self,
        kind: str,
        package: str | None = None,
        exclude: Iterable[str] = (),
        validate: Callable[[str, T], None] | None = None,
        listing: str = "Available",
    ) -> None:
        self.kind = kind
        self.package = package
        self.exclude = frozenset(exclude)
        self._validate = validate
        self._listing = listing
        self._entries: dict[str, T] = {}
        self._discovered = package is None

    # -- writing ---------------------------------------------------------------------------------

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: make the decorated object available as ``name``; registering it again is a no-op."""

        def decorate(obj: T) -> T:
            known = self._entries.get(name)
            if known is obj:
                return obj
            if known is not None:
                raise ValueError(f"{self.kind} '{name}' is registered twice ({_module(known)}, {_module(obj)})")
            if self._validate is not None:
                self._validate(name, obj)
            self._entries[name] = obj
            return obj

        return decorate

    def pop(self, name: str, default: T | None = None) -> T | None:
        """Remove ``name`` (tests remove the temporary entries they registered); ``default`` if absent."""
        return self._entries.pop(name, default)

    # -- reading ---------------------------------------------------------------------------------

    def discover(self) -> None:
        """Import the plugin package's modules once, so the built-in entries have registered themselves.

        Marked done before importing: a module that reads this registry while it is being imported gets
        the entries so far instead of recursing. A failed import clears the mark, so the next read
        raises the same error again instead of silently working with a partial registry.
        """
        if self._discovered or self.package is None:
            return
        self._discovered = True
        try:
            package = importlib.import_module(self.package)
            for info in pkgutil.iter_modules(package.__path__):
                if not info.name.startswith("_") and info.name not in self.exclude:
                    importlib.import_module(f"{self.package}.{info.name}")
        except BaseException:
            self._discovered = False
            raise

    def get(self, name: str) -> T:
        """The object registered as ``name``; a ``ConfigError`` that suggests the closest name otherwise."""
        self.discover()
        if name not in self._entries:
            hint = closest_name(name, list(self._entries))
            extra = f" Did you mean '{hint}'?" if hint else ""
            raise ConfigError(f"unknown {self.kind} '{name}'.{extra} {self._listing}: {', '.join(self.names())}")
        return self._entries[name]

    def find(self, name: str) -> T | None:
        """The object registered as ``name``, or None (for callers that report unknown names themselves)."""
        self.discover()
        return self._entries.get(name)

    def names(self) -> list[str]:
        """Registered names, sorted."""
        self.discover()
        return sorted(self._entries)

    def items(self) -> list[tuple[str, T]]:
        """(name, object) pairs, sorted by name."""
        return [(name, self._entries[name]) for name in self.names()]

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())

    def __contains__(self, name: object) -> bool:
        self.discover()
        return name in self._entries

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, package={self.package!r}, {len(self._entries)} registered)"


def _module(obj: object) -> str:
    """Where ``obj`` was defined, to tell two objects with one name apart in the collision error."""
    return getattr(obj, "__module__", None) or type(obj).__module__
