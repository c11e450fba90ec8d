"""Retention of what the MONAI Informatics Gateway path keeps, for ``mwm cleanup``.

Removed once the export task is final and completed before the cutoff (or already purged by the export
tasks' retention), never while it is unfinished:

- its hand-off record (``ig_exports``), once resolved before the cutoff, or never resolved and past its
  deadline before the cutoff (an IG path switched off before its deadline sweep ran);
- the copies MWM placed in the IG's bucket for it (``mwm-exports/<task id>/``): the IG only reads export
  files (MIG ``ExportServiceBase``: ``GetObjectAsync``, nothing deletes them), so they stay until removed
  here. Copies without a record (a hand-off whose publish failed and was given up) go once older than the
  cutoff and their task is done or gone;
- announcement claims (``ig_export_announcements``): any claim published before the cutoff (tasks failed
  before a hand-off have claims but no record), and with the record its claims never confirmed (their
  claimer died) made before the cutoff.

Removal order per task: objects, claims, then the record, so a crash leaves the record to find next run.
Nothing else is MWM's on the IG side: the IG's own uploads (``<payload id>/...``) are the IG's, and the
scheduler's staging copies them into ``jobs/<job id>/input/`` in MWM's bucket, removed with the job.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from wm.adapters.mongo import Database, delete_matching, translated_errors
from wm.adapters.objectstore import ObjectStore
from wm.domain.exports import ExportTask
from wm.domain.monai_ig import IG_EXPORTS_PREFIX, copied_for, past_retention
from wm.errors import NotFound
from wm.stores.exports import ExportTasks
from wm.stores.ig_exports import IG_EXPORT_ANNOUNCEMENTS, IG_EXPORTS


@dataclass
class IgRemoved:
    """What IG retention removed (or, in a dry run, would remove)."""

    handoffs: int = 0
    announcements: int = 0
    objects: int = 0


class IgRetention:
    """Removes the IG hand-offs, claims and copies of final tasks past the retention.

    ``ig_objects`` is the IG's bucket; None when the IG path is off (its bucket need not exist): the
    documents are removed, and copies left there go when the path is on again (no record, task gone).
    """

    def __init__(self, database: Database, ig_objects: ObjectStore | None) -> None:
        self._tasks = ExportTasks(database)
        self._handoffs = database.collection(IG_EXPORTS)
        self._announcements = database.collection(IG_EXPORT_ANNOUNCEMENTS)
        self._objects = ig_objects

    async def clean_up(self, cutoff: datetime, dry_run: bool = False) -> IgRemoved:
        """Remove what is past ``cutoff`` (``dry_run``: count only)."""
        removed = IgRemoved()
        async with translated_errors("read IG exports for retention"):
            candidates = await self._handoffs.find(
                {
                    "$or": [
                        {"resolved_at": {"$lt": cutoff}},
                        {"resolved_at": None, "deadline": {"$lt": cutoff}},
                    ]
                },
                {"_id": 1},
            ).to_list()
        done = [str(c["_id"]) for c in candidates if await self._task_done(str(c["_id"]), cutoff)]
        for task_id in sorted(done):  # objects, claims, record: a crash leaves the record to find again
            removed.objects += await self._remove_copies(f"{IG_EXPORTS_PREFIX}{task_id}/", dry_run)
            # Claims never confirmed (their claimer died); published ones go by their own age below.
            unconfirmed = {"task_id": task_id, "published_at": None, "claimed_at": {"$lt": cutoff}}
            removed.announcements += await self._delete(self._announcements, unconfirmed, dry_run)
            removed.handoffs += await self._delete(self._handoffs, {"_id": task_id}, dry_run)
        # Published before the cutoff: a task failed before its hand-off has claims but no record.
        published = {"published_at": {"$lt": cutoff}}
        removed.announcements += await self._delete(self._announcements, published, dry_run)
        removed.objects += await self._remove_orphans(cutoff, set(done), dry_run)
        return removed

    async def _task_done(self, task_id: str, cutoff: datetime) -> bool:
        """The task is final and completed before ``cutoff``, or gone (purged by retention)."""
        try:
            task: ExportTask | None = await self._tasks.get(task_id)
        except NotFound:
            task = None
        return past_retention(task, cutoff)

    async def _remove_copies(self, prefix: str, dry_run: bool) -> int:
        if self._objects is None:
            return 0
        if dry_run:
            return len(await self._objects.list(prefix))
        return await self._objects.remove_prefix(prefix)

    async def _remove_orphans(self, cutoff: datetime, counted: set[str], dry_run: bool) -> int:
        """Copies older than ``cutoff`` whose task has no record left and is done or gone."""
        if self._objects is None:
            return 0
        by_task: dict[str, list[str]] = {}
        for key in await self._objects.keys_older_than(IG_EXPORTS_PREFIX, cutoff):
            task_id = copied_for(key)
            if task_id is not None:  # not a key MWM writes: left alone
                by_task.setdefault(task_id, []).append(key)
        doomed: list[str] = []
        for task_id, keys in sorted(by_task.items()):
            if task_id in counted:  # removed (or counted, in a dry run) with its record above
                continue
            async with translated_errors("read IG export for retention"):
                has_record = await self._handoffs.find_one({"_id": task_id}, {"_id": 1}) is not None
            if not has_record and await self._task_done(task_id, cutoff):
                doomed.extend(keys)
        return len(doomed) if dry_run else await self._objects.remove_keys(doomed)

    @staticmethod
    async def _delete(collection: Any, criteria: dict[str, Any], dry_run: bool) -> int:
        return await delete_matching(collection, criteria, f"purge {collection.name}", dry_run)
