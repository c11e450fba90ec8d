"""The application catalog the discovery consumer asks, over the registry, with a short-lived cache.

Every arrived file needs its candidate applications; asking the database each time costs two round trips
per file. Answers are cached per called AE title (or per named application set) for ``ttl_s`` seconds, so a
new revision, a new mapping or a deleted application takes effect within that time (0 disables the cache).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from schemas.events import PayloadArrived
from wm.adapters.mongo import Database
from wm.domain.discovery import Candidate
from wm.registry import ApplicationRevision, Registry


class RegistryCatalog:
    """Candidates for a file: the applications it names, else those mapped to its called AE title."""

    def __init__(self, database: Database, ttl_s: float = 1.0) -> None:
        self._registry = Registry(database)
        self._ttl_s = ttl_s
        self._cache: dict[tuple[str, ...], tuple[float, list[Candidate]]] = {}

    async def candidates(self, event: PayloadArrived) -> list[Candidate]:
        """Latest active revisions only: a new revision takes over, a deleted application triggers nothing."""
        if event.application_ids:
            names = tuple(sorted(event.application_ids))
            return await self._cached(("apps", *names), lambda: self._registry.applications.latest_of(names))
        if event.called_ae_title:
            title = event.called_ae_title
            return await self._cached(("aet", title), lambda: self._registry.applications_for(title))
        return []

    async def _cached(
        self, key: tuple[str, ...], load: Callable[[], Awaitable[list[ApplicationRevision]]]
    ) -> list[Candidate]:
        now = time.monotonic()
        hit = self._cache.get(key)
        if hit is not None and now - hit[0] < self._ttl_s:
            return hit[1]
        candidates = [Candidate(r.name, r.revision, r.definition) for r in await load()]
        self._cache[key] = (now, candidates)
        return candidates


class CachedRevisions:
    """Application revisions by (name, revision): a stored revision never changes, so it is read once."""

    def __init__(self, database: Database) -> None:
        self._registry = Registry(database)
        self._cache: dict[tuple[str, int], ApplicationRevision] = {}

    async def revision(self, name: str, revision: int) -> ApplicationRevision:
        """The revision (``NotFound`` if it never existed)."""
        key = (name, revision)
        if key not in self._cache:
            self._cache[key] = await self._registry.revision(name, revision)
        return self._cache[key]
