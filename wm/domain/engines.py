"""What an orchestration engine is given and what it reports. Pure; the engine port is ``wm.ports.Engine``."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal

from schemas.applications import ApplicationDefinition
from schemas.events import FileRef

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
        """Whether the engine is done with the job (succeeded, failed or errored)."""
        return self.phase in ("succeeded", "failed", "error")
