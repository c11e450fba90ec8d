"""Applications with revisions: collection ``applications``, one document per revision.

``_id`` is ``"<name>:<revision>"`` and (name, revision) is unique, so two writers racing for the same
revision number cannot both win: the loser's insert fails and becomes ``Conflict``. The latest revision
without ``deleted_at`` is the one new data triggers; deleting sets ``deleted_at`` on every revision (soft,
history stays readable), and registering the name again continues the revision numbers.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from pymongo import ASCENDING, DESCENDING, IndexModel

from schemas.applications import ApplicationDefinition
from wm.adapters.mongo import Database, IndexSpec, find_by_id, insert_new, translated_errors
from wm.errors import Conflict, NotFound
from wm.registry.models import ApplicationRevision, Page, PageRequest

APPLICATIONS = "applications"

APPLICATIONS_INDEXES = IndexSpec(
    APPLICATIONS,
    (IndexModel([("name", ASCENDING), ("revision", ASCENDING)], unique=True, name="name_revision"),),
)

_ACTIVE: dict[str, Any] = {"deleted_at": None}


class Applications:
    """The store of application revisions (no validation: see `wm.registry.Registry`)."""

    def __init__(self, database: Database) -> None:
        self._collection = database.collection(APPLICATIONS)

    async def register(self, definition: ApplicationDefinition) -> ApplicationRevision:
        """Revision 1, or the next revision of a deleted name; ``Conflict`` if the name is active."""
        head = await self._head(definition.name)
        if head is not None and head.deleted_at is None:
            raise Conflict(f"application {definition.name!r} already exists (revision {head.revision})")
        revision = 1 if head is None else head.revision + 1
        return await self._insert(definition, revision, f"application {definition.name!r} already exists")

    async def new_revision(self, definition: ApplicationDefinition) -> ApplicationRevision:
        """The next revision of an active application; ``NotFound`` if there is none."""
        current = await self.latest(definition.name)
        revision = current.revision + 1
        return await self._insert(
            definition,
            revision,
            f"revision {revision} of {definition.name!r} was created concurrently; retry",
        )

    async def latest(self, name: str) -> ApplicationRevision:
        """The latest active revision; ``NotFound`` when there is none (unknown or deleted)."""
        async with translated_errors("read application"):
            document = await self._collection.find_one(
                {"name": name, **_ACTIVE}, sort=[("revision", DESCENDING)]
            )
        if document is None:
            raise NotFound(f"application {name!r} not found")
        return ApplicationRevision.from_document(document)

    async def revision(self, name: str, revision: int) -> ApplicationRevision:
        """One revision, deleted or not."""
        missing = f"application {name!r} has no revision {revision}"
        document = await find_by_id(
            self._collection, f"{name}:{revision}", "read application revision", missing
        )
        return ApplicationRevision.from_document(document)

    async def list_page(self, page: PageRequest) -> Page[ApplicationRevision]:
        """The latest active revision of each application, by name."""
        names: list[dict[str, Any]] = [{"$match": _ACTIVE}, {"$group": {"_id": "$name"}}]
        paged: list[dict[str, Any]] = [
            {"$sort": {"_id": 1}},
            {"$skip": page.skip},
            {"$limit": page.page_size},
        ]
        async with translated_errors("list applications"):
            counted = await (await self._collection.aggregate([*names, {"$count": "n"}])).to_list()
            rows = await (await self._collection.aggregate([*names, *paged])).to_list()
        total = counted[0]["n"] if counted else 0
        return page.of(await self.latest_of([row["_id"] for row in rows]), total)

    async def latest_of(self, names: Sequence[str]) -> list[ApplicationRevision]:
        """The latest active revision of each of ``names`` that has one, in name order (one query)."""
        if not names:
            return []
        query = {"name": {"$in": list(names)}, **_ACTIVE}
        async with translated_errors("read applications"):
            documents = (
                await self._collection.find(query)
                .sort([("name", ASCENDING), ("revision", DESCENDING)])
                .to_list()
            )
        latest: dict[str, ApplicationRevision] = {}
        for document in documents:
            if document["name"] not in latest:
                latest[document["name"]] = ApplicationRevision.from_document(document)
        return list(latest.values())

    async def using_sink(self, sink: str) -> list[str]:
        """Names of active applications whose latest revision exports to ``sink``."""
        async with translated_errors("find applications using a sink"):
            names = await self._collection.distinct("name", {"definition.sinks": sink, **_ACTIVE})
        return [app.name for app in await self.latest_of(names) if sink in app.definition.sinks]

    async def delete(self, name: str) -> None:
        """Soft-delete: mark every revision deleted; ``NotFound`` when nothing is active."""
        async with translated_errors("delete application"):
            result = await self._collection.update_many(
                {"name": name, **_ACTIVE}, {"$set": {"deleted_at": datetime.now(UTC)}}
            )
        if result.matched_count == 0:
            raise NotFound(f"application {name!r} not found")

    async def _head(self, name: str) -> ApplicationRevision | None:
        async with translated_errors("read application"):
            document = await self._collection.find_one({"name": name}, sort=[("revision", DESCENDING)])
        return None if document is None else ApplicationRevision.from_document(document)

    async def _insert(
        self, definition: ApplicationDefinition, revision: int, taken: str
    ) -> ApplicationRevision:
        record = ApplicationRevision(
            name=definition.name, revision=revision, definition=definition, created_at=datetime.now(UTC)
        )
        document = {"_id": f"{record.name}:{revision}", **record.model_dump()}
        if not await insert_new(self._collection, document, "insert application revision"):
            raise Conflict(taken)
        return record
