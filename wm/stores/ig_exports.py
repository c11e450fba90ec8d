"""Export tasks handed to a MONAI Informatics Gateway: collection ``ig_exports``, ``_id`` = export task id.

A document is inserted (unique) before the ``ExportRequestEvent`` is published, so a task id is published
at most once across replicas and redeliveries: the gateway de-duplicates requests by task id alone and
leaves a duplicate hanging unacknowledged, so a second publish would do harm. It holds what the
completion needs: the IG keys sent and the MWM keys they stand for, the results of files the sink's
extensions skipped, the deadline, and whether the task was resolved (by a completion or the deadline).

A crash between the insert and the publish leaves the document unpublished: nothing is sent, and the
deadline fails the task with a reason saying so.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from pydantic import BaseModel, ConfigDict, Field
from pymongo import ASCENDING, IndexModel

from schemas.events import FileExportResult
from wm.adapters.mongo import Database, IndexSpec, find_by_id, translated_errors

IG_EXPORTS = "ig_exports"

INDEXES = (IndexSpec(IG_EXPORTS, (IndexModel([("resolved", ASCENDING), ("deadline", ASCENDING)]),)),)


class IgExport(BaseModel):
    """One export task's hand-off to the IG."""

    model_config = ConfigDict(frozen=True)

    export_task_id: str
    job_id: str
    routing_key: str
    sent: dict[str, str] = Field(description="IG object key -> MWM object key")
    skipped: list[FileExportResult] = Field(default_factory=list)
    deadline: datetime
    published_at: datetime | None = None
    resolved: bool = False


class IgExports:
    """The hand-offs, by export task id."""

    def __init__(self, database: Database) -> None:
        self._collection = database.collection(IG_EXPORTS)

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
            await self._collection.update_one({"_id": task_id}, {"$set": {"published_at": datetime.now(UTC)}})

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
            await self._collection.update_one({"_id": task_id}, {"$set": {"resolved": True}})

    async def overdue(self, now: datetime) -> list[IgExport]:
        """Unresolved hand-offs past their deadline."""
        async with translated_errors("find overdue IG exports"):
            documents = await self._collection.find({"resolved": False, "deadline": {"$lt": now}}).to_list()
        return [_export(document) for document in documents]


def deadline_after(seconds: float, now: datetime | None = None) -> datetime:
    """When a hand-off made ``now`` times out."""
    return (now or datetime.now(UTC)) + timedelta(seconds=seconds)


def _export(document: dict[str, object]) -> IgExport:
    sent = document.get("sent") or []
    assert isinstance(sent, list)
    return IgExport.model_validate(
        {**document, "export_task_id": document["_id"], "sent": {pair["ig"]: pair["mwm"] for pair in sent}}
    )
