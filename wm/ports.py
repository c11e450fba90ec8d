"""What the core needs from outside, one Protocol each. Adapters and test fakes satisfy them structurally."""

from __future__ import annotations

from typing import Protocol

from schemas.applications import ApplicationDefinition, SinkDefinition
from schemas.events import Event, PayloadArrived
from wm.domain.discovery import Candidate
from wm.engines import Engine


class EventPublisher(Protocol):
    """Publishes events with broker confirms (``wm.adapters.rabbitmq.Bus``)."""

    async def publish(self, event: Event, *, message_id: str | None = None) -> str:
        """Publish ``event``; ``message_id`` derived from a business key makes re-publishing recognisable."""
        ...


class ApplicationCatalog(Protocol):
    """The registered applications a file may trigger."""

    async def candidates(self, event: PayloadArrived) -> list[Candidate]:
        """Latest active revisions of the applications the event names, or mapped to its called AE."""
        ...


class ApplicationRevisionView(Protocol):
    """A stored application revision."""

    @property
    def definition(self) -> ApplicationDefinition: ...


class ApplicationRevisions(Protocol):
    """Application definitions by name and revision (history stays readable after a delete)."""

    async def revision(self, name: str, revision: int) -> ApplicationRevisionView:
        """The definition of one revision; ``NotFound`` if it never existed."""
        ...


class SinkDirectory(Protocol):
    """Export sinks by name."""

    async def sink(self, name: str) -> SinkDefinition:
        """The sink; ``NotFound`` if there is none."""
        ...


class EngineDirectory(Protocol):
    """Orchestration engines by name."""

    def engine(self, name: str) -> Engine:
        """The engine plugin ``name``."""
        ...
