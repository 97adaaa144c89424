"""Modules of your own loaded into every masq process: a module that registers a measure
(:func:`masq.importance.register_measure`), a method (:func:`masq.consolidation.register_method`)
or a penalty kind when it is imported.

``masq --plugin MODULE ...`` (or ``MASQ_PLUGINS=MODULE[,MODULE...]``) imports the modules
before the command runs, and the names travel in the environment variable :data:`ENV` to the
processes a grid starts, whose workers import them before each group they run (a cached import
after the first): the local pool's spawned workers inherit the variable, a Ray cluster's get
it through the job's runtime environment (:func:`masq.grid.connect.connect_ray`). The module
must be importable there: on ``PYTHONPATH``, or installed.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterable

from masq.errors import ConfigError

ENV = "MASQ_PLUGINS"
"""The environment variable holding the plugin modules, comma-separated."""


def plugin_names(text: str | None) -> list[str]:
    """The module names of a :data:`ENV` value (comma-separated, blanks ignored)."""
    return [name.strip() for name in (text or "").split(",") if name.strip()]


def load_plugins(names: Iterable[str]) -> list[str]:
    """Import each module of ``names`` (once) and add it to :data:`ENV`, so that processes
    started from here import it too; the names now in :data:`ENV`. A module that cannot be
    imported is a one-line ConfigError naming it and the fix."""
    loaded = plugin_names(os.environ.get(ENV))
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError as err:
            raise ConfigError(
                f"plugin {name!r} cannot be imported ({err}); put its directory on PYTHONPATH "
                "(or install it) and give its module name, e.g. --plugin my_measure"
            ) from None
        except Exception as err:  # the module itself failed: say where, in one line
            raise ConfigError(
                f"plugin {name!r} failed while being imported: {type(err).__name__}: {err}"
            ) from None
        if name not in loaded:
            loaded.append(name)
    if loaded:
        os.environ[ENV] = ",".join(loaded)
    return loaded


def load_from_env() -> list[str]:
    """Import the modules named in :data:`ENV` (a worker's start; nothing when it is unset)."""
    return load_plugins(plugin_names(os.environ.get(ENV)))
