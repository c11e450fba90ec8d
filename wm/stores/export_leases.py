"""The numbered leases of export tasks: collection ``export_leases`` (``_id`` = ``<task id>#lease<n>``).

Conditional updates are not atomic across clients on FerretDB, so mutual exclusion is a unique insert:
exactly one claimer wins each number. A claimer starts at the task's latest lease (a hint mirrored on the
task): while that lease is live its holder keeps the task; once it expired (or was released) the claimer
tries to insert the next number. Only the latest lease of a task can be live, so every read and write
here is by ``_id``: the cost does not grow with the leases kept for the retention period.
"""

from __future__ import annotations

from datetime import datetime

from wm import metrics
from wm.adapters.mongo import Database, Document, insert_new, translated_errors

EXPORT_LEASES = "export_leases"
_LEASE_PROBES = 64


def lease_id(task_id: str, number: int) -> str:
    """The ``_id`` of a task's ``number``-th lease."""
    return f"{task_id}#lease{number}"


class ExportLeases:
    """The leases of export tasks, by number."""

    def __init__(self, database: Database) -> None:
        self._leases = database.collection(EXPORT_LEASES)

    async def take(
        self, task_id: str, latest: int, owner: str, now: datetime, expires_at: datetime
    ) -> int | None:
        """The number of the lease ``owner`` holds until ``expires_at`` (taken, or its own extended);
        None while another owner's lease lives. ``latest``: the task's latest lease number as last seen."""
        number = latest
        took_over = False  # the lease before ours expired without being released: its holder died or hung
        for _ in range(_LEASE_PROBES):
            holder = await self.get(task_id, number)
            if holder is None:
                if await self._insert(task_id, number, owner, now, expires_at):
                    if took_over:
                        metrics.LEASE_EXPIRIES.labels("export").inc()
                    return number
                continue  # another claimer took this number just now: look at its lease
            if holder["expires_at"] > now:
                if holder["owner"] != owner:
                    return None
                await self.extend(task_id, number, expires_at)
                return number
            took_over = holder.get("released_at") is None
            number += 1
        return None

    async def get(self, task_id: str, number: int) -> Document | None:
        """Lease ``number`` of the task; None when it was never taken."""
        async with translated_errors("read export lease"):
            return await self._leases.find_one({"_id": lease_id(task_id, number)})

    async def extend(self, task_id: str, number: int, expires_at: datetime) -> None:
        """Move the lease's end to ``expires_at``."""
        async with translated_errors("extend export lease"):
            await self._leases.update_one(
                {"_id": lease_id(task_id, number)}, {"$set": {"expires_at": expires_at}}
            )

    async def end(self, task_id: str, number: int, now: datetime, owner: str | None = None) -> bool:
        """End lease ``number`` at ``now`` if it is live (and ``owner``'s); whether it was."""
        criteria: dict[str, object] = {"_id": lease_id(task_id, number), "expires_at": {"$gt": now}}
        if owner is not None:
            criteria["owner"] = owner
        async with translated_errors("release export lease"):
            result = await self._leases.update_one(
                criteria, {"$set": {"expires_at": now, "released_at": now}}
            )
        return result.modified_count > 0

    async def abandon(self, task_id: str, number: int, now: datetime) -> bool:
        """Mark lease ``number`` released if it expired unreleased; whether it did (one caller wins).

        Such a lease was taken by a claimer that failed before its task showed the lease (the database
        dropped the connection between the two writes): the task still looks pending, nobody exports it.
        """
        criteria = {"_id": lease_id(task_id, number), "expires_at": {"$lte": now}, "released_at": None}
        async with translated_errors("abandon export lease"):
            result = await self._leases.update_one(criteria, {"$set": {"released_at": now}})
        return result.modified_count > 0

    async def forget(self, task_ids: list[str]) -> None:
        """Remove every lease of these tasks (retention)."""
        async with translated_errors("purge export leases"):
            await self._leases.delete_many({"task_id": {"$in": task_ids}})

    async def _insert(
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
