"""The export task store: collections ``export_tasks`` (``_id`` = export task id) and ``export_leases``.

Creating a task is a unique insert, so the monitor (which creates a task, then publishes
``export.requested``) and the exporter (which creates it from the self-contained event when it is missing)
may both try. The final result is written once: a second final update changes nothing and returns the task
as it is.

Claims and leases. Conditional updates are not atomic across clients on FerretDB, so mutual exclusion is a
unique insert: the n-th lease of a task is the document ``{_id: "<task id>#lease<n>"}`` in
``export_leases``. A claimer tries lease ``n`` (the task's ``lease_number`` hint); if that document exists
and is still live, someone holds the task; if it expired (or was released) the claimer tries ``n + 1``.
Exactly one claimer wins each number, so two claimers never hold the same task, and a holder that dies
gives the task back when its lease expires. The task document mirrors the live lease
(``lease_owner``, ``lease_expires_at``) for queries; the lease documents are the truth.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from pymongo import ASCENDING, IndexModel

from schemas.events import ExportOutcome, FileExportResult
from wm.adapters.mongo import Database, Document, IndexSpec, translated_errors
from wm.domain.exports import FINAL_STATES, OPEN_STATES, ExportState, ExportTask
from wm.errors import Duplicate, NotFound
from wm.registry.models import Page, PageRequest

EXPORT_TASKS = "export_tasks"
EXPORT_LEASES = "export_leases"

INDEXES = (
    IndexSpec(
        EXPORT_TASKS,
        (
            IndexModel([("sink.name", ASCENDING), ("state", ASCENDING), ("created_at", ASCENDING)]),
            IndexModel([("state", ASCENDING), ("lease_expires_at", ASCENDING)]),
            IndexModel([("completed_at", ASCENDING)]),
        ),
    ),
    IndexSpec(EXPORT_LEASES, (IndexModel([("task_id", ASCENDING), ("owner", ASCENDING)]),)),
)

FIRST_PAGE = PageRequest()
_CLAIM_CANDIDATES = 20
_LEASE_PROBES = 64
_OPEN = [state.value for state in OPEN_STATES]


def _now() -> datetime:
    return datetime.now(UTC)


def lease_id(task_id: str, number: int) -> str:
    """The ``_id`` of a task's ``number``-th lease."""
    return f"{task_id}#lease{number}"


def _task(document: Document) -> ExportTask:
    return ExportTask.model_validate({**document, "export_task_id": document["_id"]})


def _document(task: ExportTask) -> Document:
    document = task.model_dump(mode="python", exclude={"export_task_id"})
    return {"_id": task.export_task_id, **document}


def _claimable(now: datetime) -> dict[str, Any]:
    """Open tasks nobody holds: pending, or in progress under a lease that expired."""
    return {
        "$or": [
            {"state": ExportState.pending.value},
            {"state": ExportState.in_progress.value, "lease_expires_at": {"$lt": now}},
        ]
    }


class ExportTasks:
    """The export tasks and their leases."""

    def __init__(self, database: Database) -> None:
        self._tasks = database.collection(EXPORT_TASKS)
        self._leases = database.collection(EXPORT_LEASES)

    async def create(self, task: ExportTask) -> bool:
        """Insert the task; False when a task with its id exists already (nothing changes then)."""
        try:
            async with translated_errors("create export task"):
                await self._tasks.insert_one(_document(task))
        except Duplicate:
            return False
        return True

    async def get(self, task_id: str) -> ExportTask:
        """The task; ``NotFound`` when there is none."""
        async with translated_errors("read export task"):
            document = await self._tasks.find_one({"_id": task_id})
        if document is None:
            raise NotFound(f"export task {task_id!r} not found")
        return _task(document)

    async def record_result(
        self, task_id: str, outcome: ExportOutcome, results: list[FileExportResult], message: str = ""
    ) -> ExportTask:
        """Make the task final with ``outcome`` and its per-file ``results``; returns the task as stored.

        Idempotent: for a task that is final already nothing changes, and its existing outcome comes back.
        """
        now = _now()
        update = {
            "state": ExportState(outcome).value,
            "file_results": [result.model_dump() for result in results],
            "message": message,
            "completed_at": now,
            "updated_at": now,
            "lease_owner": None,
            "lease_expires_at": None,
            "completion_published": False,
        }
        async with translated_errors("record export result"):
            await self._tasks.update_one({"_id": task_id, "state": {"$in": _OPEN}}, {"$set": update})
        return await self.get(task_id)

    async def mark_published(self, task_id: str) -> None:
        """Record that the task's ``export.completed`` was published (confirmed by the broker)."""
        async with translated_errors("mark export completion published"):
            await self._tasks.update_one({"_id": task_id}, {"$set": {"completion_published": True}})

    async def query(
        self, sink: str | None = None, state: ExportState | None = None, page: PageRequest = FIRST_PAGE
    ) -> Page[ExportTask]:
        """Tasks, oldest first, optionally of one sink and in one state."""
        criteria: dict[str, Any] = {}
        if sink is not None:
            criteria["sink.name"] = sink
        if state is not None:
            criteria["state"] = state.value
        async with translated_errors("query export tasks"):
            total = await self._tasks.count_documents(criteria)
            cursor = self._tasks.find(criteria).sort([("created_at", 1), ("_id", 1)])
            documents = await cursor.skip(page.skip).limit(page.page_size).to_list()
        return page.of([_task(document) for document in documents], total)

    async def claim(self, sink: str, owner: str, lease_s: float) -> ExportTask | None:
        """Take the oldest claimable task of ``sink`` for ``lease_s`` seconds; None when there is none."""
        now = _now()
        criteria = {"sink.name": sink, **_claimable(now)}
        async with translated_errors("find claimable export tasks"):
            cursor = self._tasks.find(criteria).sort([("created_at", 1), ("_id", 1)])
            documents = await cursor.limit(_CLAIM_CANDIDATES).to_list()
        for document in documents:
            claimed = await self._lease(_task(document), owner, lease_s, now)
            if claimed is not None:
                return claimed
        return None

    async def claim_task(self, task_id: str, owner: str, lease_s: float) -> ExportTask | None:
        """Take this task for ``lease_s`` seconds; None when it is final or another owner holds it.

        Re-entrant: an owner that holds the task already gets it back, its lease extended.
        """
        task = await self.get(task_id)
        return None if task.is_final else await self._lease(task, owner, lease_s, _now())

    async def _lease(self, task: ExportTask, owner: str, lease_s: float, now: datetime) -> ExportTask | None:
        expires_at = now + timedelta(seconds=lease_s)
        number = task.lease_number
        for _ in range(_LEASE_PROBES):
            taken = await self._insert_lease(task.export_task_id, number, owner, now, expires_at)
            if taken:
                return await self._mirror_lease(task.export_task_id, number, owner, expires_at)
            holder = await self._lease_document(task.export_task_id, number)
            if holder is not None and holder["expires_at"] > now:
                if holder["owner"] != owner:
                    return None
                await self._extend(holder["_id"], expires_at)
                return await self._mirror_lease(task.export_task_id, number, owner, expires_at)
            number += 1
        return None

    async def _insert_lease(
        self, task_id: str, number: int, owner: str, now: datetime, expires_at: datetime
    ) -> bool:
        document = {
            "_id": lease_id(task_id, number),
            "task_id": task_id,
            "owner": owner,
            "acquired_at": now,
            "expires_at": expires_at,
        }
        try:
            async with translated_errors("insert export lease"):
                await self._leases.insert_one(document)
        except Duplicate:
            return False
        return True

    async def _lease_document(self, task_id: str, number: int) -> Document | None:
        async with translated_errors("read export lease"):
            return await self._leases.find_one({"_id": lease_id(task_id, number)})

    async def _extend(self, lease: str, expires_at: datetime) -> None:
        async with translated_errors("extend export lease"):
            await self._leases.update_one({"_id": lease}, {"$set": {"expires_at": expires_at}})

    async def _mirror_lease(
        self, task_id: str, number: int, owner: str, expires_at: datetime
    ) -> ExportTask | None:
        """Show the lease on the task; None when the task became final meanwhile."""
        update = {
            "$set": {
                "state": ExportState.in_progress.value,
                "lease_owner": owner,
                "lease_expires_at": expires_at,
                "lease_number": number + 1,
                "updated_at": _now(),
            },
            "$inc": {"attempts": 1},
        }
        async with translated_errors("record export lease"):
            await self._tasks.update_one({"_id": task_id, "state": {"$in": _OPEN}}, update)
        task = await self.get(task_id)
        return None if task.is_final else task

    async def release(self, task_id: str, owner: str) -> bool:
        """End ``owner``'s live lease on the task, which becomes pending again; False if it held none."""
        now = _now()
        async with translated_errors("release export lease"):
            result = await self._leases.update_many(
                {"task_id": task_id, "owner": owner, "expires_at": {"$gt": now}},
                {"$set": {"expires_at": now, "released_at": now}},
            )
            await self._tasks.update_one(
                {"_id": task_id, "state": ExportState.in_progress.value, "lease_owner": owner},
                {
                    "$set": {
                        "state": ExportState.pending.value,
                        "lease_owner": None,
                        "lease_expires_at": None,
                        "updated_at": now,
                    }
                },
            )
        return result.modified_count > 0

    async def expire(self) -> list[ExportTask]:
        """Put tasks whose lease expired back to pending; returns them (as they are now)."""
        now = _now()
        criteria = {"state": ExportState.in_progress.value, "lease_expires_at": {"$lt": now}}
        async with translated_errors("find expired export leases"):
            documents = await self._tasks.find(criteria).to_list()
        expired = []
        for document in documents:
            async with translated_errors("expire export lease"):
                await self._tasks.update_one(
                    {
                        "_id": document["_id"],
                        "state": ExportState.in_progress.value,
                        "lease_expires_at": document["lease_expires_at"],
                    },
                    {
                        "$set": {
                            "state": ExportState.pending.value,
                            "lease_owner": None,
                            "lease_expires_at": None,
                            "updated_at": now,
                        }
                    },
                )
            expired.append(await self.get(document["_id"]))
        return [task for task in expired if task.state == ExportState.pending]

    async def forget_before(self, cutoff: datetime) -> int:
        """Remove final tasks completed before ``cutoff`` and their leases (retention); returns how many."""
        final = [state.value for state in FINAL_STATES]
        criteria = {"state": {"$in": final}, "completed_at": {"$lt": cutoff}}
        async with translated_errors("purge export tasks"):
            ids = [d["_id"] for d in await self._tasks.find(criteria, {"_id": 1}).to_list()]
            if not ids:
                return 0
            await self._leases.delete_many({"task_id": {"$in": ids}})
            result = await self._tasks.delete_many({"_id": {"$in": ids}})
        return result.deleted_count
