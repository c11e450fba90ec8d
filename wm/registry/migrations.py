"""A small versioned migration mechanism: collection ``schema_migrations``.

``MIGRATIONS`` is an ordered list of ``(id, function)``. At start-up `migrate` runs each one whose id is
not recorded yet, then records it by inserting ``{"_id": id}`` (unique). Two processes starting together
may both run a migration before one records it, so every migration must be idempotent (creating indexes
is). Append new migrations; never edit or reorder applied ones.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime

from wm.adapters.mongo import Database, insert_new, translated_errors
from wm.registry.aetitles import AE_TITLE_LINKS_INDEXES
from wm.registry.applications import APPLICATIONS_INDEXES
from wm.stores.auth import API_KEYS_INDEXES

SCHEMA_MIGRATIONS = "schema_migrations"

Migration = tuple[str, Callable[[Database], Awaitable[None]]]


async def _create_registry_indexes(database: Database) -> None:
    # Only the missing ones: a process that starts beside another one that applied this migration (not
    # recorded yet) must not send indexes that exist (FerretDB drops the connection then).
    await database.ensure_indexes((APPLICATIONS_INDEXES, AE_TITLE_LINKS_INDEXES, API_KEYS_INDEXES))


MIGRATIONS: tuple[Migration, ...] = (("0001-registry-indexes", _create_registry_indexes),)


async def migrate(database: Database, migrations: Sequence[Migration] = MIGRATIONS) -> list[str]:
    """Apply the migrations not yet recorded, in order; returns the ids applied now."""
    collection = database.collection(SCHEMA_MIGRATIONS)
    async with translated_errors("read migrations"):
        done = {document["_id"] for document in await collection.find({}, {"_id": 1}).to_list()}
    applied = []
    for migration_id, apply in migrations:
        if migration_id in done:
            continue
        await apply(database)
        record = {"_id": migration_id, "applied_at": datetime.now(UTC)}
        if await insert_new(collection, record, "record migration"):  # else another process recorded it
            applied.append(migration_id)
    return applied
