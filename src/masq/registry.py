"""Registries: plain dicts of named entries (the importance measures of :mod:`masq.importance`,
the consolidation methods of :mod:`masq.consolidation`), filled by the modules that define
them and by your code, with a one-line error for an unknown name that lists the known ones.

:data:`REGISTRIES` holds each under the name a configuration field refers to ("measure",
"method"), so that :meth:`masq.config.RunConfig.validate` checks names without importing the
packages above it.
"""

from __future__ import annotations

from typing import Any, TypeVar

from masq.errors import ConfigError

T = TypeVar("T")


class Registry(dict[str, T]):
    """A registry: a plain dict of named entries, filled by the modules that define them (and
    by your code), with a one-line ConfigError for an unknown name that lists the known ones.

    ``field`` is the RunConfig field whose value names an entry ("importance"), ``what`` how
    messages call an entry ("importance measure"), ``hint`` how to add one.
    """

    def __init__(self, field: str, what: str, hint: str) -> None:
        super().__init__()
        self.field, self.what, self.hint = field, what, hint

    def register(self, name: str, entry: T, *, replace: bool = False) -> T:
        """Enter ``entry`` as ``name``; a ConfigError if another entry has the name (the same
        one again is harmless), unless ``replace``. Returns it."""
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{self.what}: the name must be a non-empty string, got {name!r}")
        if name in self and not replace and self[name] != entry:
            raise ConfigError(
                f"{self.what} {name!r} is already registered; pick another name or pass "
                "replace=True"
            )
        self[name] = entry
        return entry

    def lookup(self, name: object, where: str = "") -> T:
        """The entry named ``name`` (a string or a ``str`` Enum member); else a one-line
        ConfigError naming the field and listing the known names."""
        key = str(getattr(name, "value", name))
        if key not in self:
            raise ConfigError(
                f"{where}{self.field}: unknown {self.what} {key!r}; use one of "
                f"{', '.join(self.names())} (or register yours with {self.hint})"
            )
        return self[key]

    def names(self) -> tuple[str, ...]:
        """The registered names, sorted."""
        return tuple(sorted(self))


REGISTRIES: dict[str, Registry[Any]] = {}

__all__ = ["REGISTRIES", "Registry"]
