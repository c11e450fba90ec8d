"""The export task store: collections ``export_tasks`` (``_id`` = export task id) and ``export_leases``.

Creating a task is a unique insert, so the monitor (which creates a task, then publishes
``export.requested``) and the exporter (which creates it from the self-contained event when it is missing)
may both try. The final result is written once: a second final update changes nothing and returns the task
as it is. Which tasks are open is kept apart, in a watch list read by ``_id`` (``wm.stores.export_index``).

Claims and leases. Mutual exclusion is a unique insert of the task's next numbered lease
(``wm.stores.export_leases``): exactly one claimer wins each number, so two claimers never hold the same
task, and a holder that dies gives the task back when its lease expires. The task document mirrors the
live lease (``lease_owner``, ``lease_expires_at``, ``lease_number``); the lease documents are the truth.

Pull clients (the Export API) quote their lease back: ``owner`` and lease ``number``. Only the holder of
the task's current, live lease may extend it, report progress, release it or make the task final
(``Conflict`` otherwise); a final update repeated by the client that made it returns the final task.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

from pymongo import ASCENDING, IndexModel

from schemas.events import ExportOutcome, FileExportResult
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
from wm.stores import export_index
from wm.stores.export_index import ExportWatch
from wm.stores.export_leases import EXPORT_LEASES, ExportLeases

EXPORT_TASKS = "export_tasks"

INDEXES = (
    IndexSpec(
        EXPORT_TASKS,
        (
            IndexModel([("sink.name", ASCENDING), ("state", ASCENDING), ("created_at", ASCENDING)]),
            IndexModel([("state", ASCENDING), ("created_at", ASCENDING)]),  # the fleet gauges (wm.fleet)
            IndexModel([("completed_at", ASCENDING)]),
        ),
    ),
    IndexSpec(EXPORT_LEASES, (IndexModel([("task_id", ASCENDING), ("owner", ASCENDING)]),)),
    *export_index.INDEXES,
)

FIRST_PAGE = PageRequest()
_CLAIM_CANDIDATES = 20
_OPEN = [state.value for state in OPEN_STATES]


def _now() -> datetime:
    return datetime.now(UTC)


def _task(document: Document) -> ExportTask:
    return ExportTask.model_validate({**document, "export_task_id": document["_id"]})


def _document(task: ExportTask) -> Document:
    document = task.model_dump(mode="python", exclude={"export_task_id"})
    return {"_id": task.export_task_id, **document}


class ExportTasks:
    """The export tasks and their leases."""

    def __init__(self, database: Database) -> None:
        self._tasks = database.collection(EXPORT_TASKS)
        self._leases = ExportLeases(database)
        self._watch = ExportWatch(database)

    async def create(self, task: ExportTask) -> bool:
        """Insert the task; False when a task with its id exists already. Either way an open task is
        watched."""
        created = await insert_new(self._tasks, _document(task), "create export task")
        if not created:
            task = await self.get(task.export_task_id)
        if not task.is_final:
            await self.watch(task)
        return created

    async def watch(self, task: ExportTask) -> None:
        """Put the open task on the watch list that the lease sweep and claims read."""
        await self._watch.watch(task.export_task_id, task.sink.name, task.created_at, task.reruns)

    async def watch_open(self) -> int:
        """Watch every open task missing from the watch list; how many (once per start: a scan)."""
        async with translated_errors("find open export tasks"):
            documents = await self._tasks.find({"state": {"$in": _OPEN}}).to_list(None)
        watched = await self._watch.watched()
        missing = [_task(document) for document in documents if document["_id"] not in watched]
        for task in missing:
            await self.watch(task)
        return len(missing)

    async def _open_tasks(self, watched: list[tuple[str, int]]) -> list[ExportTask]:
        """The watched tasks that are still open, read by ``_id``; the others leave the watch list."""
        async with translated_errors("read export tasks"):
            documents = await asyncio.gather(*(self._tasks.find_one({"_id": i}) for i, _ in watched))
        open_tasks = []
        for (task_id, reruns), document in zip(watched, documents, strict=True):
            task = None if document is None else _task(document)
            if task is not None and not task.is_final:
                open_tasks.append(task)
            elif task is None or task.reruns >= reruns:  # final (or purged); a newer run keeps its entry
                await self._watch.unwatch(task_id, reruns)
        return open_tasks

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
        task = await self.get(task_id)
        if task.is_final:
            await self._watch.unwatch(task_id, task.reruns)
        return task

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
        watched = await self._watch.open(sink)
        for start in range(0, len(watched), _CLAIM_CANDIDATES):
            for task in await self._open_tasks(watched[start : start + _CLAIM_CANDIDATES]):
                claimed = await self._lease(task, owner, lease_s, now) if task.claimable(now) else None
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
        latest = max(task.lease_number - 1, 0)
        number = await self._leases.take(task.export_task_id, latest, owner, now, expires_at)
        return (
            None
            if number is None
            else await self._mirror_lease(task.export_task_id, number, owner, expires_at)
        )

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
        # Only the latest lease can be live (the next number is taken once it ended): end it by ``_id``.
        task = await self.get(task_id)
        released = await self._leases.end(task_id, max(task.lease_number - 1, 0), now, owner)
        async with translated_errors("release export lease"):
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
        return released

    async def expire(self) -> list[ExportTask]:
        """Put tasks whose lease expired back to pending; returns them (as they are now), with the pending
        tasks whose lease was taken but never shown on the task (see `ExportLeases.abandon`)."""
        now = _now()
        open_tasks = await self._open_tasks(await self._watch.open())
        lapsed = [task for task in open_tasks if task.lease_expired(now)]
        expired = []
        for task in lapsed:
            async with translated_errors("expire export lease"):
                await self._tasks.update_one(
                    {
                        "_id": task.export_task_id,
                        "state": ExportState.in_progress.value,
                        "lease_expires_at": task.lease_expires_at,
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
            expired.append(await self.get(task.export_task_id))
        # A pending task's next lease, taken and expired unreleased: its claimer never got to show it.
        for task in open_tasks:
            if task.state == ExportState.pending and await self._leases.abandon(
                task.export_task_id, task.lease_number, now
            ):
                expired.append(task)
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
            await self._leases.forget(ids)
            result = await self._tasks.delete_many({"_id": {"$in": ids}})
        return result.deleted_count

    async def holding(self, task_id: str, owner: str, number: int, final_ok: bool = False) -> ExportTask:
        """The task, when ``owner`` holds its current lease ``number`` and that lease is live.

        With ``final_ok``, a final task whose last lease was ``owner``'s comes back too; else ``Conflict``.
        """
        task = await self.get(task_id)
        lease = await self._leases.get(task_id, number)
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
        await self._leases.extend(task_id, number, expires_at)
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
