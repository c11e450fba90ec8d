"""Export sinks: collection ``sinks``, ``_id`` is the sink's name (unique by construction)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

from schemas.applications import SinkDefinition
from wm.adapters.mongo import Database, find_by_id, insert_new, translated_errors
from wm.errors import Conflict, NotFound
from wm.registry.models import Page, PageRequest

SINKS = "sinks"


class Sinks:
    """The store of sink definitions."""

    def __init__(self, database: Database) -> None:
        self._collection = database.collection(SINKS)

    async def create(self, sink: SinkDefinition) -> SinkDefinition:
        """Store a new sink; ``Conflict`` when the name is taken."""
        document = {"_id": sink.name, "definition": sink.model_dump(), "created_at": datetime.now(UTC)}
        if not await insert_new(self._collection, document, "create sink"):
            raise Conflict(f"sink {sink.name!r} already exists")
        return sink

    async def get(self, name: str) -> SinkDefinition:
        """The sink ``name``; ``NotFound`` when there is none."""
        document = await find_by_id(self._collection, name, "read sink", f"sink {name!r} not found")
        return SinkDefinition.model_validate(document["definition"])

    async def list_page(self, page: PageRequest) -> Page[SinkDefinition]:
        """Sinks by name."""
        async with translated_errors("list sinks"):
            total = await self._collection.count_documents({})
            cursor = self._collection.find({}).sort("_id", 1).skip(page.skip).limit(page.page_size)
            documents = await cursor.to_list()
        return page.of([SinkDefinition.model_validate(d["definition"]) for d in documents], total)

    async def existing(self, names: Sequence[str]) -> set[str]:
        """Which of ``names`` are sinks (one query)."""
        if not names:
            return set()
        async with translated_errors("read sinks"):
            documents = await self._collection.find({"_id": {"$in": list(names)}}, {"_id": 1}).to_list()
        return {document["_id"] for document in documents}

    async def delete(self, name: str) -> None:
        """Remove the sink; ``NotFound`` when there is none."""
        async with translated_errors("delete sink"):
            result = await self._collection.delete_one({"_id": name})
        if result.deleted_count == 0:
            raise NotFound(f"sink {name!r} not found")
