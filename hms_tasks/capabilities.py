"""The capabilities of hms-tasks: the one list through which the core knows them.

A capability is one package, ``hms_tasks/<name>/``, holding all of it:

- ``__init__.py``: its public API, in ``__all__``;
- ``names.py``: its Celery task names (import-light: clients and beat import it);
- ``settings.py``: its ``HMS_TASKS_*`` settings (a :class:`hms_tasks.conf.Settings` section),
  and optionally ``celery_options() -> dict`` with Celery defaults it needs;
- ``tasks.py``: thin Celery tasks over plain functions, on the queue ``hms.<name>``;
- ``cli.py`` (optional): ``commands``, a list of click commands mounted on ``hms-tasks``;
- ``docs/<name>.md``: its manual.

Adding a capability is one new folder and one entry here; nothing else in the core changes.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable, Mapping
from types import ModuleType
from typing import Any

__all__ = ["CAPABILITIES", "lazy_exports", "modules", "queue"]

CAPABILITIES: tuple[str, ...] = (
    "cache", "metrics", "memory", "health", "loadtest", "queries", "assets",
)


def queue(capability: str) -> str:
    """The queue of a capability's tasks: ``hms.<capability>``."""
    return f"hms.{capability}"


def module_names(part: str) -> list[str]:
    """``hms_tasks.<capability>.<part>`` of every capability that has that module."""
    out = []
    for cap in CAPABILITIES:
        name = f"hms_tasks.{cap}.{part}"
        if importlib.util.find_spec(name) is not None:
            out.append(name)
    return out


def modules(part: str) -> list[ModuleType]:
    """The imported ``hms_tasks.<capability>.<part>`` modules (those that exist)."""
    return [importlib.import_module(name) for name in module_names(part)]


def lazy_exports(package: str,
                 table: Mapping[str, str | tuple[str, str]]) -> Callable[[str], Any]:
    """The module ``__getattr__`` (PEP 562) of a capability's ``__init__``: each public name is
    imported from its module on first use and then kept in the package, so importing the
    package (or its import-light ``names``) pulls in no Celery, Django or Redis. ``table`` maps
    a public name to its module, or to ``(module, attribute)`` when the names differ."""

    def __getattr__(name: str) -> Any:
        home = table.get(name)
        if home is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module, attr = (home, name) if isinstance(home, str) else home
        value = getattr(importlib.import_module(f"{package}.{module}"), attr)
        setattr(sys.modules[package], name, value)
        return value

    return __getattr__
