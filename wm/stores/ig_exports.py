"""Export tasks handed to a MONAI Informatics Gateway: collection ``ig_exports``, ``_id`` = export task id.

A document is inserted (unique) before the ``ExportRequestEvent`` is published, so a task id is published
at most once across replicas and redeliveries: the gateway de-duplicates requests by task id alone and
leaves a duplicate hanging unacknowledged, so a second publish would do harm. It holds what the
completion needs (``wm.domain.monai_ig.IgExport``): the IG keys sent and the MWM keys they stand for, the
results of files the sink's extensions skipped, the deadline, and whether and when the task was resolved (by
a completion or the deadline; ``mwm cleanup`` removes it past the retention: ``wm.stores.ig_retention``).

A crash between the insert and the publish leaves the document unpublished: nothing is sent, and the
deadline fails the task with a reason saying so.

Announcements: collection ``ig_export_announcements``, ``_id`` = the ``export.completed`` message id. Two
completions of one task handled at once (IG 0.5 re-sends one it published before a crash), or a
completion and the deadline, both reach a final task; the one whose insert wins publishes its
``export.completed`` (`announce_once`), the others leave it. A claimer whose publish fails gives the claim
back; one that died holding it is taken over once the claim is stale (`announce_stale`).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from pymongo import ASCENDING, IndexModel

from wm.adapters.mongo import Database, IndexSpec, find_by_id, insert_new, reclaim_stale, translated_errors
from wm.domain.exports import ExportTask, completed_message_id
from wm.domain.monai_ig import IgExport
from wm.errors import NotFound, TransientError
from wm.ports import EventPublisher, ExportTaskRecords, IgExportRecords
from wm.stores.exports import announce_completion

IG_EXPORTS = "ig_exports"
IG_EXPORT_ANNOUNCEMENTS = "ig_export_announcements"

INDEXES = (
    IndexSpec(
        IG_EXPORTS,
        (
            IndexModel([("resolved", ASCENDING), ("deadline", ASCENDING)]),
            IndexModel([("resolved_at", ASCENDING), ("deadline", ASCENDING)]),  # retention
        ),
    ),
    IndexSpec(
        IG_EXPORT_ANNOUNCEMENTS,
        (
            IndexModel([("published_at", ASCENDING), ("claimed_at", ASCENDING)]),
            IndexModel([("task_id", ASCENDING)]),  # retention: a purged task's claims
        ),
    ),
)


def _now() -> datetime:
    return datetime.now(UTC)


class IgExports:
    """The hand-offs, by export task id, and the claims on announcing their end."""

    def __init__(self, database: Database) -> None:
        self._collection = database.collection(IG_EXPORTS)
        self._announcements = database.collection(IG_EXPORT_ANNOUNCEMENTS)

    async def begin(self, export: IgExport) -> None:
        """Record the hand-off before publishing it; ``Duplicate`` when the task was handed off already."""
        document = {"_id": export.export_task_id, **export.model_dump(exclude={"export_task_id"})}
        # Object keys hold dots, fine in values but not in field names; FerretDB refuses nested arrays.
        document["sent"] = [{"ig": ig_key, "mwm": mwm_key} for ig_key, mwm_key in export.sent.items()]
        async with translated_errors("record IG export"):
            await self._collection.insert_one(document)

    async def published(self, task_id: str) -> None:
        """The broker confirmed the request."""
        async with translated_errors("mark IG export published"):
            await self._collection.update_one({"_id": task_id}, {"$set": {"published_at": _now()}})

    async def abandon(self, task_id: str) -> None:
        """The publish failed before the broker took it: the next attempt may hand the task off again."""
        async with translated_errors("abandon IG export"):
            await self._collection.delete_one({"_id": task_id, "published_at": None})

    async def get(self, task_id: str) -> IgExport:
        """The hand-off of a task; ``NotFound`` when MWM never handed that task to the IG."""
        missing = f"no IG export for task {task_id!r}"
        return _export(await find_by_id(self._collection, task_id, "read IG export", missing))

    async def resolve(self, task_id: str) -> None:
        """The task's result is recorded (completion or deadline): nothing waits for it any more."""
        async with translated_errors("resolve IG export"):
            await self._collection.update_one(
                {"_id": task_id, "resolved": False}, {"$set": {"resolved": True, "resolved_at": _now()}}
            )

    async def overdue(self, now: datetime) -> list[IgExport]:
        """Unresolved hand-offs past their deadline."""
        async with translated_errors("find overdue IG exports"):
            documents = await self._collection.find({"resolved": False, "deadline": {"$lt": now}}).to_list()
        return [_export(document) for document in documents]

    async def claim_announcement(self, message_id: str, task_id: str) -> bool:
        """True for exactly one caller per ``export.completed`` message id: the one that publishes it."""
        document = {"_id": message_id, "task_id": task_id, "claimed_at": _now(), "published_at": None}
        return await insert_new(self._announcements, document, "claim IG export announcement")

    async def release_announcement(self, message_id: str) -> None:
        """Drop an unconfirmed claim (its publish failed): the next attempt may claim it again."""
        async with translated_errors("release IG export announcement"):
            await self._announcements.delete_one({"_id": message_id, "published_at": None})

    async def mark_announced(self, message_id: str) -> None:
        """The claimed ``export.completed`` was published (confirmed by the broker)."""
        async with translated_errors("mark IG export announced"):
            await self._announcements.update_one({"_id": message_id}, {"$set": {"published_at": _now()}})

    async def stale_announcements(self, older_than: timedelta) -> list[tuple[str, str]]:
        """Claims not confirmed within ``older_than`` (the claimer died): (message id, task id) pairs."""
        criteria = {"published_at": None, "claimed_at": {"$lte": _now() - older_than}}
        async with translated_errors("find stale IG export announcements"):
            documents = await self._announcements.find(criteria).to_list(100)
        return [(str(document["_id"]), str(document["task_id"])) for document in documents]

    async def reclaim_announcement(self, message_id: str, older_than: timedelta) -> bool:
        """Take over a stale claim: one caller wins by re-stamping the claim time it read.

        On FerretDB the re-stamp is read-then-write, so two sweepers may both win a claim whose claimer
        died: that rare double publish carries one message id, which consumers recognise.
        """
        return await reclaim_stale(
            self._announcements, message_id, older_than, "reclaim IG export announcement"
        )


async def announce_once(
    tasks: ExportTaskRecords, handoffs: IgExportRecords, bus: EventPublisher, task: ExportTask
) -> bool:
    """Publish the final task's ``export.completed`` when this caller wins its claim; True when it did.

    A caller that loses leaves the publish to the winner. A winner whose publish (or its confirmation)
    fails gives the claim back before the error goes on, so the handler's retry claims it again.
    """
    if task.completion_published:
        return False
    message_id = completed_message_id(task.export_task_id, task.reruns)
    if not await handoffs.claim_announcement(message_id, task.export_task_id):
        return False
    try:
        await announce_completion(tasks, bus, task)
    except TransientError:
        await handoffs.release_announcement(message_id)
        raise
    await handoffs.mark_announced(message_id)
    return True


async def announce_stale(
    tasks: ExportTaskRecords, handoffs: IgExportRecords, bus: EventPublisher, older_than: timedelta
) -> int:
    """Publish the ``export.completed`` of claims whose claimer died before confirming; returns how many."""
    announced = 0
    for message_id, task_id in await handoffs.stale_announcements(older_than):
        try:
            task: ExportTask | None = await tasks.get(task_id)
        except NotFound:  # purged since (retention): nothing left to announce, nor to hold up the others
            task = None
        if (
            task is not None
            and completed_message_id(task.export_task_id, task.reruns) == message_id
            and not task.completion_published
        ):
            if not await handoffs.reclaim_announcement(message_id, older_than):
                continue  # another sweeper took it over
            await announce_completion(tasks, bus, task)
            announced += 1
        await handoffs.mark_announced(message_id)  # published now, by its claimer, or nothing to publish
    return announced


def deadline_after(seconds: float, now: datetime | None = None) -> datetime:
    """When a hand-off made ``now`` times out."""
    return (now or _now()) + timedelta(seconds=seconds)


def _export(document: dict[str, object]) -> IgExport:
    sent = document.get("sent") or []
    assert isinstance(sent, list)
    return IgExport.model_validate(
        {**document, "export_task_id": document["_id"], "sent": {pair["ig"]: pair["mwm"] for pair in sent}}
    )
