"""The watch list of open export tasks: what the lease sweep and a claim read instead of querying tasks.

On the MongoDB-wire server any query but an ``_id`` equality scans (and decodes) the whole collection, and
export tasks are kept for ``export.retention_days``: the exporter's sweep for expired leases (every
replica, every ``export.sweep_interval_s``) and a pull client's claim (every poll) would grow with every
export ever made if they queried ``export_tasks`` by state. ``export_watch`` holds one small document per task
that is not final (``_id`` = task id, ``sink``, ``created_at``, ``reruns``), and the readers look the
tasks themselves up by ``_id``, so their cost follows the open work only.

- An entry is written after its task is inserted, and again by every repeated ``create`` of an open task
  (the exporter creates the task from each request it receives), which repairs an entry lost to a crash
  in between; an operator's retry writes it again after reopening the task; the exporter watches every
  open task left out once when it starts.
- It is removed by whoever makes the task final, or by the next reader that finds the task final or
  gone. A removal names the task's ``reruns`` it saw final: an entry an operator's retry rewrote meanwhile
  (a higher ``reruns``) stays.
"""

from __future__ import annotations

from datetime import datetime

from pymongo import ASCENDING, IndexModel

from wm.adapters.mongo import Database, IndexSpec, translated_errors, upsert

EXPORT_WATCH = "export_watch"
INDEXES = (IndexSpec(EXPORT_WATCH, (IndexModel([("sink", ASCENDING), ("created_at", ASCENDING)]),)),)


class ExportWatch:
    """The ids of the export tasks that are not final."""

    def __init__(self, database: Database) -> None:
        self._watch = database.collection(EXPORT_WATCH)

    async def watch(self, task_id: str, sink: str, created_at: datetime, reruns: int) -> None:
        """Watch the task (open in its ``reruns``-th run); an entry of a later run stands."""
        update = {"$set": {"sink": sink, "created_at": created_at}, "$max": {"reruns": reruns}}
        await upsert(self._watch, {"_id": task_id}, update, "watch export task")

    async def open(self, sink: str | None = None) -> list[tuple[str, int]]:
        """The watched tasks (of ``sink``), oldest first: (task id, run)."""
        criteria = {} if sink is None else {"sink": sink}
        async with translated_errors("read open export tasks"):
            cursor = self._watch.find(criteria, {"reruns": 1}).sort([("created_at", 1), ("_id", 1)])
            return [(str(entry["_id"]), int(entry.get("reruns", 0))) for entry in await cursor.to_list(None)]

    async def unwatch(self, task_id: str, reruns: int) -> None:
        """The task's run ``reruns`` (and any before it) is final: no reader needs to look at it again."""
        async with translated_errors("unwatch export task"):
            await self._watch.delete_one({"_id": task_id, "reruns": {"$lte": reruns}})

    async def watched(self) -> set[str]:
        """Every watched task id (the exporter's start-up repair reads it once)."""
        async with translated_errors("read export watch list"):
            return {str(task_id) for task_id in await self._watch.distinct("_id")}
