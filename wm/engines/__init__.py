"""Orchestration engine plugins, found by name in the ``mwm.engines`` entry-point group.

An engine validates an application, launches a job, reports its status, cancels it and cleans up.
Built in: ``local`` (one machine: a container runtime if present, else a local command) and ``argo``
(Argo Workflows through its official SDK).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from importlib.metadata import entry_points
from typing import Literal, Protocol

from schemas.applications import ApplicationDefinition
from schemas.events import FileRef
from wm.config import Settings
from wm.errors import PermanentError

ENGINE_GROUP = "mwm.engines"

EnginePhase = Literal["pending", "running", "succeeded", "failed", "error"]


@dataclass(frozen=True)
class JobSpec:
    """What an engine needs to run one job."""

    job_id: str
    correlation_id: str
    application: ApplicationDefinition
    input_prefix: str
    output_prefix: str
    deadline: datetime


@dataclass(frozen=True)
class EngineStatus:
    """An engine's view of a job."""

    phase: EnginePhase
    message: str = ""
    outputs: list[FileRef] = field(default_factory=list)

    @property
    def terminal(self) -> bool:
        return self.phase in ("succeeded", "failed", "error")


class Engine(Protocol):
    """The orchestration engine plugin interface."""

    name: str

    async def validate(self, application: ApplicationDefinition) -> list[str]:
        """Problems that would stop the application from running here (empty when it can run)."""
        ...

    async def launch(self, job: JobSpec) -> str:
        """Start the job; returns the engine's job id. Idempotent for the same ``job.job_id``."""
        ...

    async def status(self, engine_job_id: str) -> EngineStatus:
        """The job's phase, message and (when it succeeded) outputs."""
        ...

    async def cancel(self, engine_job_id: str) -> None:
        """Stop the job; a job that is already gone is not an error."""
        ...

    async def cleanup(self, engine_job_id: str) -> None:
        """Release what the engine holds for a finished job."""
        ...


class EngineFactory(Protocol):
    """What the ``mwm.engines`` entry point names: builds an engine from the settings."""

    def __call__(self, settings: Settings) -> Engine: ...


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
    factory: EngineFactory = matches[0].load()
    return factory(settings)


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
