"""Buckets in MongoDB: files join open buckets; a due bucket closes exactly once, across replicas.

Exactly-once rests on inserts under unique ``_id`` indexes (no transactions, no atomic conditional updates
on FerretDB):

- ``buckets``: one document per bucket generation, ``_id`` = bucket id; creating a generation twice is a
  duplicate insert, so every replica agrees on it. ``closes_at``: the end of its quiet period, moved later
  by each file (``$max``).
- ``bucket_files``: ``_id`` = file id (bucket key + object key): a redelivered event adds nothing.
  ``bucket_id`` says which generation the file is heading for; ``arrived_at`` when it arrived.
- ``bucket_closures``: ``_id`` = bucket id. The one closer whose insert wins closes the bucket.
- ``bucket_memberships`` (``wm.stores.bucket_memberships``): ``_id`` = file id + bucket id. A file that
  joins a bucket while it closes is contested: the closer and the late file each try to insert the same
  membership; exactly one wins. If the closer wins the file is in the bucket; otherwise the file moves to
  the next generation. The closer's memberships and, last in the same ordered insert, the seal (``_id`` =
  ``seal|<bucket id>``, holding the outgoing ``bucket.ready``) are one write: a seal exists only once every
  member is secured, and the event is published only after its seal is stored (an outbox).

Why no file is lost or counted twice: a file first records its bucket (write W1: its document, then a slot
of the bucket, ``wm.stores.bucket_index``), then looks for that bucket's closure (read R1); the closer first
inserts the closure (W2), then reads the bucket's slots and their files (R2).
Either R2 sees the file (the closer contests it) or R2 came before W1, hence W2 before R1 and the file
sees the closure (the file contests it). If both see each other, the unique insert decides.

Cost: FerretDB (v1, SQLite) looks a document up by ``_id`` equality cheaply but scans (and decodes) the
whole collection for any other query, and these documents are kept for the retention period, so the hot
paths use ``_id`` look-ups and inserts only: the closer reads its bucket's slots and files by ``_id``, and
the sweep reads the watch list of buckets not closed yet (``wm.stores.bucket_index``), not ``buckets``. A file
costs an insert, a ``$max`` on its bucket and its watch entry (in parallel), a slot and a look-up of the
bucket's closure; each replica remembers the generation it last saw open per
bucket key (a hint, never trusted: a file that joins a generation that closed meanwhile sees its closure and
moves on). A closure costs a bucket look-up, the closure insert, the files read and the seal, then the
publish; the bucket is marked closed after the publish.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from pymongo import ASCENDING, IndexModel

from schemas.events import BucketReady, PayloadArrived
from wm.adapters.mongo import Database, Document, IndexSpec, insert_new, translated_errors
from wm.domain.discovery import Joined, Placement, closes_at, file_id
from wm.stores import bucket_index, bucket_memberships
from wm.stores.bucket_index import BucketSlots, BucketWatch
from wm.stores.bucket_memberships import MEMBERSHIPS as MEMBERSHIPS  # re-exported for the store's users
from wm.stores.bucket_memberships import BucketMemberships
from wm.stores.bucket_memberships import membership_id as membership_id
from wm.stores.bucket_memberships import seal_id as seal_id

BUCKETS = "buckets"
FILES = "bucket_files"
CLOSURES = "bucket_closures"
KEYS = "bucket_keys"
"""Per bucket key whose generations retention removed: the generation to start from (``_id`` = key)."""
OPEN_HINTS = 10_000  # bucket keys remembered per replica; past this the hints start over

INDEXES = (
    IndexSpec(
        BUCKETS,
        (
            IndexModel([("state", ASCENDING), ("closes_at", ASCENDING)]),
            IndexModel([("key", ASCENDING), ("generation", ASCENDING)], unique=True),
        ),
    ),
    IndexSpec(FILES, (IndexModel([("bucket_id", ASCENDING)]),)),
    IndexSpec(CLOSURES, (IndexModel([("published_at", ASCENDING)]),)),
    *bucket_memberships.INDEXES,
    *bucket_index.INDEXES,
)


@dataclass(frozen=True)
class Closing:
    """What an attempt to close a bucket came to: its event, a later due time, or nothing to do."""

    event: BucketReady | None = None
    not_before: datetime | None = None
    closed: bool = False  # this caller closed the bucket: publish ``event`` (if any), then ``mark_published``


def _now() -> datetime:
    return datetime.now(UTC)


class BucketStore:
    """Bucket operations for the discovery consumer."""

    def __init__(self, database: Database) -> None:
        self._buckets = database.collection(BUCKETS)
        self._files = database.collection(FILES)
        self._closures = database.collection(CLOSURES)
        self._keys = database.collection(KEYS)
        self._memberships = BucketMemberships(database)
        self._watch = BucketWatch(database)
        self._slots = BucketSlots(database)
        self._open: dict[str, Document] = {}  # bucket key -> the generation last seen open here

    async def add_file(self, placement: Placement, event: PayloadArrived) -> Joined:
        """Add a file to the open generation of its bucket (idempotent for a redelivered event)."""
        fid = file_id(placement, event)
        arrived_at = _now()
        async with translated_errors("add file to bucket"):
            bucket = self._open.get(placement.bucket_key) or await self._open_generation(
                placement, event.correlation_id
            )
            due = closes_at(arrived_at, placement.quiet_period_s)
            inserted, _ = await asyncio.gather(
                self._insert_file(fid, bucket["_id"], arrived_at, event), self._extend(bucket["_id"], due)
            )
            if not inserted:
                existing = await self._files.find_one({"_id": fid})  # a redelivery: it heads somewhere
                assert existing is not None
                bucket = await self._bucket(existing["bucket_id"]) or bucket
            await self._slots.add(bucket["_id"], fid)  # W1 ends: the closer reads the bucket's slots
            heading, still_open = await self._settle_membership(placement, fid, bucket, event.correlation_id)
            if heading["_id"] != bucket["_id"]:
                await self._extend(heading["_id"], due)
        self._remember(placement.bucket_key, heading if still_open else None)
        return Joined(str(heading["_id"]), max(due, heading["closes_at"]))

    async def _extend(self, bucket_id: str, due: datetime) -> None:
        await asyncio.gather(
            self._buckets.update_one({"_id": bucket_id}, {"$max": {"closes_at": due}}),
            self._watch.extend(bucket_id, due),
        )

    async def _insert_file(
        self, fid: str, bucket_id: str, arrived_at: datetime, event: PayloadArrived
    ) -> bool:
        """Record the file as heading for ``bucket_id`` (W1); False when it was recorded before."""
        document = {
            "_id": fid,
            "bucket_id": bucket_id,
            "arrived_at": arrived_at,
            "file": event.file.model_dump(mode="json"),
            "dicom": event.dicom.model_dump(mode="json"),
            "interrupted": event.interrupted,
        }
        return await insert_new(self._files, document, "record bucket file")

    async def watch_open(self) -> int:
        """Watch every open bucket missing from the watch list; how many (once per start, a scan).

        Repairs what a failed write left out, and takes in buckets recorded before the list existed.
        """
        async with translated_errors("watch open buckets"):
            open_buckets = await self._buckets.find({"state": "open"}, {"closes_at": 1}).to_list(None)
            watched = await self._watch.watched()
            missing = [doc for doc in open_buckets if doc["_id"] not in watched]
            for doc in missing:
                await self._watch.extend(doc["_id"], doc["closes_at"])
        return len(missing)

    def _remember(self, key: str, bucket: Document | None) -> None:
        if bucket is None:
            self._open.pop(key, None)
            return
        if len(self._open) >= OPEN_HINTS:
            self._open.clear()
        self._open[key] = bucket

    def _forget(self, bucket: Document) -> None:
        if self._open.get(bucket["key"], {}).get("_id") == bucket["_id"]:
            del self._open[bucket["key"]]

    async def _settle_membership(
        self, placement: Placement, fid: str, bucket: Document, correlation_id: str
    ) -> tuple[Document, bool]:
        """If the file's bucket started closing, contest the file; move it on while it loses.

        Returns the bucket the file heads for, and whether that bucket is still open (not closing).
        """
        while await self._closures.find_one({"_id": bucket["_id"]}, {"_id": 1}) is not None:
            if not await self._memberships.contest(fid, bucket["_id"], winner="file"):
                return bucket, False  # the closer took the file into the closing bucket
            bucket = await self._generation(placement, bucket["generation"] + 1, correlation_id)
            await self._files.update_one({"_id": fid}, {"$set": {"bucket_id": bucket["_id"]}})
            await self._slots.add(bucket["_id"], fid)
        return bucket, True

    async def _open_generation(self, placement: Placement, correlation_id: str) -> Document:
        """The first generation not closed yet (created if none is), by ``_id`` look-ups.

        The walk starts after the generations retention removed (``bucket_keys``), so a bucket id, and the
        job id derived from it, is never used twice.
        """
        removed = await self._keys.find_one({"_id": placement.bucket_key})
        generation = int(removed["next_generation"]) if removed else 1
        while (bucket := await self._bucket(placement.bucket_id(generation))) is not None:
            if bucket["state"] == "open":
                return bucket
            generation += 1
        return await self._generation(placement, generation, correlation_id)

    async def _generation(self, placement: Placement, generation: int, correlation_id: str) -> Document:
        """Bucket generation ``generation``, created if missing (concurrent creators agree)."""
        bucket_id = placement.bucket_id(generation)
        now = _now()
        document = {
            "_id": bucket_id,
            "key": placement.bucket_key,
            "generation": generation,
            "state": "open",
            "application": placement.application,
            "revision": placement.revision,
            "grouping_tag": placement.grouping_tag,
            "grouping_value": placement.grouping_value,
            "quiet_period_s": placement.quiet_period_s,
            "correlation_id": correlation_id,
            "opened_at": now,
            "closes_at": closes_at(now, placement.quiet_period_s),
        }
        if await insert_new(self._buckets, document, "open bucket generation"):
            return document
        existing = await self._bucket(bucket_id)
        assert existing is not None
        return existing

    async def _bucket(self, bucket_id: str) -> Document | None:
        return await self._buckets.find_one({"_id": bucket_id})

    async def due(self, now: datetime, limit: int = 100) -> list[str]:
        """Open buckets whose quiet period is over."""
        async with translated_errors("find due buckets"):
            return [str(entry["_id"]) for entry in await self._watch.due(now, limit)]

    async def close(self, bucket_id: str, now: datetime) -> Closing:
        """Close a due bucket if this caller wins the closure: the event to publish, or why not."""
        async with translated_errors("close bucket"):
            bucket = await self._bucket(bucket_id)
            if bucket is None or bucket["state"] != "open":
                if bucket is not None:
                    self._forget(bucket)
                await self._watch.unwatch(bucket_id)  # left behind by a replica that died, or a late file
                return Closing()
            if bucket["closes_at"] > now:
                # a later file (maybe on another replica) moved it; the watch list follows
                await self._watch.extend(bucket_id, bucket["closes_at"])
                return Closing(not_before=bucket["closes_at"])
            self._forget(bucket)
            closure = {"_id": bucket_id, "claimed_at": now, "closer": os.getpid()}
            if not await insert_new(self._closures, closure, "claim bucket closure"):
                return Closing()  # another closer won
            return Closing(event=await self._seal(bucket, now), closed=True)

    async def _seal(self, bucket: Document, now: datetime) -> BucketReady | None:
        """Secure every file heading here and store the event (the seal, ``wm.stores.bucket_memberships``)."""
        return await self._memberships.seal(bucket, await self._heading_for(bucket["_id"]), now)

    async def _heading_for(self, bucket_id: str) -> list[Document]:
        """The files heading for the bucket (R2): its slots' files still recorded as heading there."""
        file_ids = await self._slots.members(bucket_id)
        files = await asyncio.gather(*(self._files.find_one({"_id": fid}) for fid in file_ids))
        return [doc for doc in files if doc is not None and doc["bucket_id"] == bucket_id]

    async def mark_published(self, bucket_id: str) -> None:
        """Record that the bucket's ``bucket.ready`` was confirmed by the broker (and the bucket closed)."""
        async with translated_errors("mark bucket published"):
            now = _now()
            await asyncio.gather(
                self._closures.update_one({"_id": bucket_id}, {"$set": {"published_at": now}}),
                self._buckets.update_one({"_id": bucket_id}, {"$set": {"state": "closed", "closed_at": now}}),
            )
            await self._watch.unwatch(bucket_id)

    async def unpublished(self, older_than: timedelta, now: datetime) -> list[tuple[str, BucketReady | None]]:
        """Closures whose event was not confirmed in time (the closer died): to finish or re-publish."""
        async with translated_errors("find unpublished closures"):
            # A closing bucket stays on the watch list until its event is published: look there, by _id.
            cutoff = now - older_than
            watched = await self._watch.due(cutoff, 100)
            closures = await asyncio.gather(*(self._closures.find_one({"_id": w["_id"]}) for w in watched))
            stale = [c for c in closures if c and c.get("published_at") is None and c["claimed_at"] <= cutoff]
            results: list[tuple[str, BucketReady | None]] = []
            for closure in stale:
                bucket_id = str(closure["_id"])
                if await self._memberships.is_sealed(bucket_id):
                    event = await self._memberships.sealed(bucket_id)
                else:  # died before sealing: seal now (contests and memberships are idempotent)
                    bucket = await self._bucket(bucket_id)
                    event = await self._seal(bucket, closure["claimed_at"]) if bucket else None
                results.append((bucket_id, event))
            return results
