"""Shared by the history benchmarks: the same queries on an empty database and on one with a history."""

from __future__ import annotations

import tempfile
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

from bus_hop import bench_settings, wait_for_services

from wm.adapters.mongo import Database, IndexSpec


@asynccontextmanager
async def empty_and_full(indexes: Sequence[IndexSpec]) -> AsyncIterator[tuple[Database, Database]]:
    """Two databases of this run with ``indexes`` (one to stay empty, one to seed), dropped afterwards."""
    with tempfile.TemporaryDirectory(prefix="mwm-bench-") as work:
        empty_settings, full_settings = bench_settings(Path(work)), bench_settings(Path(work))
        await wait_for_services(empty_settings)
        async with (
            Database(empty_settings.mongo, indexes) as empty,
            Database(full_settings.mongo, indexes) as full,
        ):
            try:
                yield empty, full
            finally:
                for database in (empty, full):
                    await database.db.client.drop_database(database.settings.database)
