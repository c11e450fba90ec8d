"""Export retry: delayed redelivery while a destination is unavailable, and an operator's retry.

Delayed redelivery. When a sink raises ``DestinationUnavailable`` (a PACS refusing connections, aborting,
timing out, out of resources), the exporter keeps the results of the files that got through on the task,
gives its lease back (the task is ``pending``), and writes a *timer*: one small document in
``export_retries`` (``_id`` = task id, ``due_at``). The delivery is acknowledged, so no prefetch slot is
held while the destination is down. Every exporter replica looks at the due timers every
`export.redelivery_sweep_s` and re-publishes the task's ``export.requested`` (its own message id per
redelivery); the exporter that receives it claims the task and sends only the files not sent yet. Timers
exist only for tasks that wait, so the look-up stays small whatever the history (a watch list, as
``job_checks`` for jobs). The waits follow ``RedeliveryPolicy`` (exponential backoff with jitter, from
``tenacity``); once ``export.redelivery_window_s`` has passed since the first failure the task fails.

The timer is written before the task gives its lease back: a crash in between leaves a timer for a task
still held (its redelivery finds the task held, or expired and re-requested, and does nothing) rather
than a pending task no one will ask for. Two replicas may both re-publish one due timer: the second
request finds the task held or final (a duplicate).

Operator retry (``mwm exports retry``, ``POST /exports/{id}/retry``): a ``failed`` or ``partial`` task is
reopened with the results of the files that were sent, and requested again: only its failed files go.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from pymongo import ASCENDING, IndexModel

from schemas.events import FileExportResult
from wm.adapters.mongo import Database, IndexSpec, translated_errors
from wm.domain.exports import (
    ExportState,
    ExportTask,
    RedeliveryPolicy,
    kept_results,
    merge_results,
    requested_event,
)
from wm.errors import Conflict
from wm.ports import EventPublisher
from wm.stores.export_leases import ExportLeases
from wm.stores.exports import EXPORT_TASKS, ExportTasks

EXPORT_RETRIES = "export_retries"
INDEXES = (IndexSpec(EXPORT_RETRIES, (IndexModel([("due_at", ASCENDING)]),)),)
"""How often each exporter looks for due redeliveries (the small ``export_retries`` collection)."""
REOPENABLE = frozenset({ExportState.failed, ExportState.partial})


def _now() -> datetime:
    return datetime.now(UTC)


class ExportRetries:
    """Deferred export tasks (their timers) and reopened ones."""

    def __init__(self, database: Database) -> None:
        self._tasks = ExportTasks(database)
        self._documents = database.collection(EXPORT_TASKS)
        self._timers = database.collection(EXPORT_RETRIES)
        self._leases = ExportLeases(database)

    async def defer(
        self,
        task: ExportTask,
        owner: str,
        results: list[FileExportResult],
        reason: str,
        policy: RedeliveryPolicy,
    ) -> ExportTask | None:
        """Give the held ``task`` back until its next redelivery; None once its window is over.

        ``results``: what this attempt's sink reported before the destination became unavailable.
        """
        now = _now()
        since = task.retrying_since or now
        due = policy.next_at(since, task.retries, now)
        if due is None:
            return None
        kept = merge_results(task.files, kept_results(task.file_results), kept_results(results))
        changes: dict[str, Any] = {
            "file_results": [result.model_dump() for result in kept],
            "message": f"{reason}; sent again after {due.isoformat()}",
            "retrying_since": since,
            "retries": task.retries + 1,
            "retry_at": due,
            "updated_at": now,
        }
        async with translated_errors("defer export task"):
            await self._timers.update_one(
                {"_id": task.export_task_id}, {"$set": {"due_at": due}}, upsert=True
            )
            held = {"_id": task.export_task_id, "state": ExportState.in_progress.value, "lease_owner": owner}
            await self._documents.update_one(held, {"$set": changes})
        await self._tasks.release(task.export_task_id, owner)
        return await self._tasks.get(task.export_task_id)

    async def due(self, now: datetime, limit: int = 100) -> list[tuple[str, datetime]]:
        """Timers that are due: (task id, due time)."""
        async with translated_errors("find due export redeliveries"):
            cursor = self._timers.find({"due_at": {"$lte": now}}).sort("due_at", ASCENDING).limit(limit)
            return [(str(doc["_id"]), doc["due_at"]) for doc in await cursor.to_list(None)]

    async def redeliver(self, task_id: str, due_at: datetime, bus: EventPublisher) -> bool:
        """Request a due task again and drop its timer; False when it needed nothing (final, or re-timed)."""
        task = await self._tasks.get(task_id)
        wanted = not task.is_final
        if wanted:
            message_id = f"{task_id}.requested.retry{task.retries}.r{task.reruns}"
            await bus.publish(requested_event(task), message_id=message_id)
        async with translated_errors("drop export redelivery"):
            await self._timers.delete_one({"_id": task_id, "due_at": due_at})  # a newer timer stays
        return wanted

    async def reopen(self, task_id: str, bus: EventPublisher) -> ExportTask:
        """An operator's retry of an ended task: pending again with its sent files' results; requested.

        ``Conflict`` unless the task is ``failed`` or ``partial``.
        """
        task = await self._tasks.get(task_id)
        if task.state not in REOPENABLE:
            raise Conflict(
                f"export task {task_id!r} is {task.state}: only a failed or partial task is retried"
            )
        kept = kept_results(task.file_results)
        changes: dict[str, Any] = {
            "state": ExportState.pending.value,
            "file_results": [result.model_dump() for result in kept],
            "message": f"retried by an operator: {len(task.files) - len(kept)} file(s) to send",
            "completed_at": None,
            "completion_published": False,
            "retries": 0,
            "retrying_since": None,
            "retry_at": None,
            "reruns": task.reruns + 1,
            "updated_at": _now(),
        }
        # The last lease may still run (a final update leaves it be): end it, or no one could claim.
        await self._leases.end(task_id, max(task.lease_number - 1, 0), changes["updated_at"])
        async with translated_errors("reopen export task"):
            result = await self._documents.update_one(
                {"_id": task_id, "state": task.state.value, "completed_at": task.completed_at},
                {"$set": changes},
            )
        if result.matched_count == 0:
            raise Conflict(f"export task {task_id!r} changed while it was being retried; look at it again")
        reopened = await self._tasks.get(task_id)
        await self._tasks.watch(reopened)  # after the update: see ``wm.stores.export_index``
        await bus.publish(requested_event(reopened), message_id=f"{task_id}.requested.rerun{reopened.reruns}")
        return reopened
