"""The application catalog the discovery consumer asks, over the registry."""

from __future__ import annotations

from schemas.events import PayloadArrived
from wm.adapters.mongo import Database
from wm.domain.discovery import Candidate
from wm.registry import Registry


class RegistryCatalog:
    """Candidates for a file: the applications it names, else those mapped to its called AE title."""

    def __init__(self, database: Database) -> None:
        self._registry = Registry(database)

    async def candidates(self, event: PayloadArrived) -> list[Candidate]:
        """Latest active revisions only: a new revision takes over, a deleted application triggers nothing."""
        if event.application_ids:
            revisions = await self._registry.applications.latest_of(event.application_ids)
        elif event.called_ae_title:
            revisions = await self._registry.applications_for(event.called_ae_title)
        else:
            revisions = []
        return [Candidate(r.name, r.revision, r.definition) for r in revisions]
