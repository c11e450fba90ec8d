"""Orchestration engine plugins, found by name in the ``mwm.engines`` entry-point group.

An engine validates an application, launches a job, reports its status, cancels it and cleans up.
Built in: ``local`` (one machine: a container runtime if present, else a local command) and ``argo``
(Argo Workflows through its official SDK, installed with the ``argo`` extra: ``pip install 'mwm[argo]'``).

An entry point names an `EngineFactory`: it declares its ``settings_type`` (`wm.plugins`) and is called
with that part of MWM's settings alone.
"""

from __future__ import annotations

from importlib.metadata import entry_points
from typing import Any, Protocol

from wm.config import Settings
from wm.domain.engines import EnginePhase, EngineStatus, JobSpec
from wm.errors import PermanentError
from wm.plugins import PluginSettings, plugin_settings
from wm.ports import Engine

__all__ = [
    "ENGINE_GROUP",
    "Engine",
    "EngineFactory",
    "EnginePhase",
    "EngineStatus",
    "JobSpec",
    "LoadedEngines",
    "available_engines",
    "load_engine",
]

ENGINE_GROUP = "mwm.engines"


class EngineFactory(Protocol):
    """What an ``mwm.engines`` entry point names: an engine built from the settings it declares."""

    @property
    def settings_type(self) -> type[PluginSettings]:
        """What the engine reads of MWM's settings (`wm.plugins`)."""
        ...

    def __call__(self, settings: Any) -> Engine:
        """The engine, given a ``settings_type`` instance (``Any``: each engine names its own model)."""
        ...


def available_engines() -> list[str]:
    """Names of the installed engine plugins."""
    return sorted(ep.name for ep in entry_points(group=ENGINE_GROUP))


def load_engine(name: str, settings: Settings) -> Engine:
    """The engine plugin ``name``; ``PermanentError`` naming the installed ones when it is unknown."""
    matches = [ep for ep in entry_points(group=ENGINE_GROUP) if ep.name == name]
    if not matches:
        raise PermanentError(
            f"unknown engine {name!r}; installed: {', '.join(available_engines()) or 'none'}"
        )
    try:
        factory: EngineFactory = matches[0].load()
    except ImportError as exc:  # a plugin whose optional dependencies are not installed
        raise PermanentError(
            f"engine {name!r} cannot be loaded, a dependency is missing ({exc}); "
            f"the built-in ones come with their extra: pip install 'mwm[{name}]'"
        ) from exc
    return factory(plugin_settings(factory, settings))


class LoadedEngines:
    """Engine plugins by name, each built once per process."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._engines: dict[str, Engine] = {}

    def engine(self, name: str) -> Engine:
        """The engine ``name`` (``PermanentError`` when no such plugin is installed)."""
        if name not in self._engines:
            self._engines[name] = load_engine(name, self._settings)
        return self._engines[name]
