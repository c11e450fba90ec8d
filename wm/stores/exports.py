"""The export task store: collections ``export_tasks`` (``_id`` = export task id) and ``export_leases``.

Creating a task is a unique insert, so the monitor (which creates a task, then publishes
``export.requested``) and the exporter (which creates it from the self-contained event when it is missing)
may both try. The final result is written once: a second final update changes nothing and returns the task
as it is.

Claims and leases. Conditional updates are not atomic across clients on FerretDB, so mutual exclusion is a
unique insert: the n-th lease of a task is the document ``{_id: "<task id>#lease<n>"}`` in
``export_leases``. A claimer looks at the task's latest lease (``lease_number - 1``, a hint): if it is
still live, someone holds the task; if it expired (or was released) the claimer tries to insert the next.
Exactly one claimer wins each number, so two claimers never hold the same task, and a holder that dies
gives the task back when its lease expires. The task document mirrors the live lease
(``lease_owner``, ``lease_expires_at``) for queries; the lease documents are the truth.

Pull clients (the Export API) quote their lease back: ``owner`` and lease ``number``. Only the holder of
the task's current, live lease may extend it, report progress, release it or make the task final
(``Conflict`` otherwise); a final update repeated by the client that made it returns the final task.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from pymongo import ASCENDING, IndexModel

from schemas.events import ExportOutcome, FileExportResult
from wm import metrics
from wm.adapters.mongo import Database, Document, IndexSpec, find_by_id, insert_new, translated_errors
from wm.domain.exports import (
    FINAL_STATES,
    OPEN_STATES,
    ExportState,
    ExportTask,
    completed_event,
    completed_message_id,
    final_result,
    merge_results,
)
from wm.errors import Conflict
from wm.ports import EventPublisher, ExportTaskRecords
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
        return await insert_new(self._tasks, _document(task), "create export task")

    async def get(self, task_id: str) -> ExportTask:
        """The task; ``NotFound`` when there is none."""
        missing = f"export task {task_id!r} not found"
        return _task(await find_by_id(self._tasks, task_id, "read export task", missing))

    async def record_result(
        self,
        task_id: str,
        outcome: ExportOutcome,
        results: list[FileExportResult],
        message: str = "",
        owner: str | None = None,
    ) -> ExportTask:
        """Make the task final with ``outcome`` and its per-file ``results``; returns the task as stored.

        Idempotent: for a task that is final already nothing changes, and its existing outcome comes back.
        With ``owner``, only while ``owner`` holds the task (else it comes back unchanged, still open).
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
        criteria: dict[str, Any] = {"_id": task_id, "state": {"$in": _OPEN}}
        if owner is not None:
            criteria["lease_owner"] = owner
        async with translated_errors("record export result"):
            await self._tasks.update_one(criteria, {"$set": update})
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
        # Start at the task's latest lease, which may still be live: a claimer that read the task after
        # another one's claim was mirrored must not take the next number while that lease lives.
        number = max(task.lease_number - 1, 0)
        took_over = False  # the lease before ours expired without being released: its holder died or hung
        for _ in range(_LEASE_PROBES):
            holder = await self._lease_document(task.export_task_id, number)
            if holder is None:
                if await self._insert_lease(task.export_task_id, number, owner, now, expires_at):
                    if took_over:
                        metrics.LEASE_EXPIRIES.labels("export").inc()
                    return await self._mirror_lease(task.export_task_id, number, owner, expires_at)
                continue  # another claimer took this number just now: look at its lease
            if holder["expires_at"] > now:
                if holder["owner"] != owner:
                    return None
                await self._extend(holder["_id"], expires_at)
                return await self._mirror_lease(task.export_task_id, number, owner, expires_at)
            took_over = holder.get("released_at") is None
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
        return await insert_new(self._leases, document, "insert export lease")

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

    async def forget_before(self, cutoff: datetime, dry_run: bool = False) -> int:
        """Remove final tasks completed before ``cutoff`` and their leases (retention); returns how many.

        With ``dry_run``, only counts them.
        """
        final = [state.value for state in FINAL_STATES]
        criteria = {"state": {"$in": final}, "completed_at": {"$lt": cutoff}}
        async with translated_errors("purge export tasks"):
            ids = [d["_id"] for d in await self._tasks.find(criteria, {"_id": 1}).to_list()]
            if not ids or dry_run:
                return len(ids)
            await self._leases.delete_many({"task_id": {"$in": ids}})
            result = await self._tasks.delete_many({"_id": {"$in": ids}})
        return result.deleted_count

    async def holding(self, task_id: str, owner: str, number: int, final_ok: bool = False) -> ExportTask:
        """The task, when ``owner`` holds its current lease ``number`` and that lease is live.

        With ``final_ok``, a final task whose last lease was ``owner``'s comes back too; else ``Conflict``.
        """
        task = await self.get(task_id)
        lease = await self._lease_document(task_id, number)
        current = number == task.lease_number - 1 and lease is not None and lease["owner"] == owner
        if task.is_final:
            live = final_ok
        else:
            live = lease is not None and lease["expires_at"] > _now() and task.lease_owner == owner
        if not (current and live):
            state = f"final ({task.state})" if task.is_final else f"held by {task.lease_owner or 'nobody'}"
            raise Conflict(f"export task {task_id!r} is not held by {owner!r} under lease {number}: {state}")
        return task

    async def extend(self, task_id: str, owner: str, number: int, lease_s: float) -> ExportTask:
        """Extend the holder's live lease to ``lease_s`` seconds from now."""
        await self.holding(task_id, owner, number)
        expires_at = _now() + timedelta(seconds=lease_s)
        await self._extend(lease_id(task_id, number), expires_at)
        async with translated_errors("record export lease"):
            await self._tasks.update_one(
                {"_id": task_id, "state": ExportState.in_progress.value, "lease_owner": owner},
                {"$set": {"lease_expires_at": expires_at, "updated_at": _now()}},
            )
        return await self.holding(task_id, owner, number)

    async def report(
        self, task_id: str, owner: str, number: int, results: list[FileExportResult], message: str = ""
    ) -> ExportTask:
        """Progress from the holder: its per-file results so far, merged into the task's."""
        task = await self.holding(task_id, owner, number)
        merged = merge_results(task.files, task.file_results, results)
        update = {"file_results": [r.model_dump() for r in merged], "message": message, "updated_at": _now()}
        held = {"_id": task_id, "state": ExportState.in_progress.value, "lease_owner": owner}
        async with translated_errors("record export progress"):
            await self._tasks.update_one(held, {"$set": update})
        return await self.get(task_id)

    async def finish(
        self,
        task_id: str,
        owner: str,
        number: int,
        results: list[FileExportResult],
        outcome: ExportOutcome | None = None,
        message: str = "",
    ) -> ExportTask:
        """The holder's final update: every file's result (earlier reports included) and the outcome.

        The outcome is computed from the results unless given. Repeated by the same holder, it returns the
        final task unchanged.
        """
        task = await self.holding(task_id, owner, number, final_ok=True)
        if task.is_final:
            return task
        outcome, complete, text = final_result(task.files, [*task.file_results, *results], outcome)
        final = await self.record_result(task_id, outcome, complete, message or text, owner=owner)
        if not final.is_final:
            raise Conflict(f"export task {task_id!r}: the lease of {owner!r} ended before the final update")
        return final

    async def release_lease(self, task_id: str, owner: str, number: int) -> None:
        """The holder gives its live lease up: the task is pending (claimable) again."""
        await self.holding(task_id, owner, number)
        await self.release(task_id, owner)


async def announce_completion(tasks: ExportTaskRecords, bus: EventPublisher, task: ExportTask) -> None:
    """Publish a final task's ``export.completed`` unless that was done (and confirmed) already.

    The outbox's second half: the final state is written first, then published, then marked published;
    a crash in between leaves the flag unset, and the next call re-publishes under the same message id.
    """
    if task.completion_published:
        return
    await bus.publish(
        completed_event(task), message_id=completed_message_id(task.export_task_id, task.reruns)
    )
    await tasks.mark_published(task.export_task_id)
