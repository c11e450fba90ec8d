"""What discovery's hot paths read by ``_id`` instead of by query: open buckets, and the files of a bucket.

On the MongoDB-wire server any query but an ``_id`` equality scans (and decodes) the whole collection, and
bucket documents are kept for the retention period: a sweep for due buckets or a closure's read of its
files would grow with every study ever received (0.1 s per 1,000 buckets, 1.3 s per 10,000 files).

- ``bucket_watch``: the watch list of buckets not yet closed, one small document per bucket (``_id`` =
  bucket id, ``closes_at``), as ``job_checks`` is for jobs. Every file that joins a bucket upserts it
  (``$max``), so an entry lost to a crash is written again by the next file or the redelivery; it is
  removed once the bucket's ``bucket.ready`` is published, or by the next look at a bucket found closed.
  The sweep reads only this list.
- ``bucket_slots``: the ids of the files heading for a bucket, in numbered slots (``_id`` =
  ``<bucket id>#<n>``). A slot is taken by a unique insert, and slot ``n`` is only tried once slot ``n - 1``
  is known to exist, so the taken slots always form a prefix ``0 .. k-1``. The closer reads slots from 0
  up to the first missing one. Why no file is lost: a file takes its slot after its file document is
  written and before it looks for its bucket's closure (W1, then R1 in ``wm.stores.buckets``); the closer
  inserts
  the closure, then reads the slots (W2, then R2). A slot the closer found missing, and every later one,
  was taken after R2 began, hence after W2: its file sees the closure and contests its membership. A file
  may have several slots (a redelivery takes one again, in case a crash came between the two writes):
  the closer counts each file once.
"""

from __future__ import annotations

import asyncio
from datetime import datetime

from pymongo import ASCENDING, IndexModel

from wm.adapters.mongo import Database, Document, IndexSpec, insert_new, translated_errors, upsert

WATCH = "bucket_watch"
SLOTS = "bucket_slots"
INDEXES = (
    IndexSpec(WATCH, (IndexModel([("closes_at", ASCENDING)]),)),
    IndexSpec(SLOTS, (IndexModel([("bucket_id", ASCENDING)]),)),
)
READ_AHEAD = 32
"""Slots read at once by a closer (concurrent ``_id`` look-ups)."""
SLOT_HINTS = 10_000
"""Buckets whose next free slot a replica remembers; past this the hints start over."""


def slot_id(bucket_id: str, number: int) -> str:
    """The ``_id`` of slot ``number`` of a bucket."""
    return f"{bucket_id}#{number}"


class BucketWatch:
    """The watch list of buckets that are not closed yet."""

    def __init__(self, database: Database) -> None:
        self._watch = database.collection(WATCH)

    async def extend(self, bucket_id: str, due: datetime) -> None:
        """Watch the bucket, due at ``due`` at the earliest (a later due time already recorded stands)."""
        await upsert(self._watch, {"_id": bucket_id}, {"$max": {"closes_at": due}}, "watch bucket")

    async def due(self, now: datetime, limit: int) -> list[Document]:
        """Watched buckets due by ``now``: ``{_id, closes_at}``, the longest due first."""
        cursor = self._watch.find({"closes_at": {"$lte": now}}).sort("closes_at", ASCENDING)
        return list(await cursor.limit(limit).to_list(None))

    async def unwatch(self, bucket_id: str) -> None:
        """The bucket is closed and its event published: no one needs to look at it again."""
        await self._watch.delete_one({"_id": bucket_id})

    async def watched(self) -> set[str]:
        """Every watched bucket id (a start-up repair reads it once)."""
        return {str(bucket_id) for bucket_id in await self._watch.distinct("_id")}


class BucketSlots:
    """The file ids of each bucket, readable by ``_id``."""

    def __init__(self, database: Database) -> None:
        self._slots = database.collection(SLOTS)
        self._next: dict[str, int] = {}  # bucket id -> a slot number at or below its first free one

    async def add(self, bucket_id: str, file_id: str) -> None:
        """Record that ``file_id`` heads for ``bucket_id`` (W1): in the first free slot."""
        number = self._next.get(bucket_id)
        if number is None:
            number = await self._first_free(bucket_id)
        while not await self._take(bucket_id, number, file_id):
            number += 1  # taken meanwhile: slot ``number`` exists, so ``number + 1`` may be tried
        if len(self._next) >= SLOT_HINTS:
            self._next.clear()
        self._next[bucket_id] = number + 1

    async def members(self, bucket_id: str) -> list[str]:
        """The file ids in the bucket's slots up to the first missing one (R2), each once, in slot order."""
        found: dict[str, None] = {}
        start = 0
        while True:
            numbers = range(start, start + READ_AHEAD)
            async with translated_errors("read bucket slots"):
                slots = await asyncio.gather(
                    *(self._slots.find_one({"_id": slot_id(bucket_id, n)}, {"file_id": 1}) for n in numbers)
                )
            for slot in slots:
                if slot is None:
                    return list(found)
                found[str(slot["file_id"])] = None
            start += READ_AHEAD

    async def _take(self, bucket_id: str, number: int, file_id: str) -> bool:
        document = {"_id": slot_id(bucket_id, number), "bucket_id": bucket_id, "file_id": file_id}
        return await insert_new(self._slots, document, "take bucket slot")

    async def _first_free(self, bucket_id: str) -> int:
        """The first free slot, found with O(log n) look-ups (the taken slots form a prefix)."""
        taken, step = -1, 1  # slot ``taken`` exists (or -1); look further in doubling steps
        while await self._exists(bucket_id, taken + step):
            taken, step = taken + step, step * 2
        free = taken + step  # missing; the first free one lies in (taken, free]
        while free - taken > 1:
            middle = (taken + free) // 2
            if await self._exists(bucket_id, middle):
                taken = middle
            else:
                free = middle
        return free

    async def _exists(self, bucket_id: str, number: int) -> bool:
        async with translated_errors("read bucket slot"):
            return await self._slots.find_one({"_id": slot_id(bucket_id, number)}, {"_id": 1}) is not None
