"""Buckets in MongoDB: files join open buckets; a due bucket closes exactly once, across replicas.

Exactly-once rests on inserts under unique ``_id`` indexes (no transactions, no atomic conditional updates
on FerretDB):

- ``buckets``: one document per bucket generation, ``_id`` = bucket id; creating a generation twice is a
  duplicate insert, so every replica agrees on it.
- ``bucket_files``: ``_id`` = file id (bucket key + object key): a redelivered event adds nothing.
  ``bucket_id`` says which generation the file is heading for.
- ``bucket_closures``: ``_id`` = bucket id. The one closer whose insert wins closes the bucket, and the
  closure document keeps the outgoing ``bucket.ready`` (an outbox) until it is published.
- ``bucket_memberships``: ``_id`` = file id + bucket id. A file that joins a bucket while it closes is
  contested: the closer and the late file each try to insert the same membership; exactly one wins. If the
  closer wins the file is in the bucket; otherwise the file moves to the next generation.

Why no file is lost or counted twice: a file first records its bucket (write W1), then looks for that
bucket's closure (read R1); the closer first inserts the closure (W2), then reads the bucket's files (R2).
Either R2 sees the file (the closer contests it) or R2 came before W1, hence W2 before R1 and the file
sees the closure (the file contests it). If both see each other, the unique insert decides.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from pymongo import ASCENDING, IndexModel
from pymongo.errors import BulkWriteError

from schemas.events import BucketFile, BucketReady, PayloadArrived
from wm.adapters.mongo import DUPLICATE_KEY, Database, Document, IndexSpec, translated_errors
from wm.domain.discovery import Placement, bucket_ready, closes_at, file_id
from wm.errors import Duplicate

BUCKETS = "buckets"
FILES = "bucket_files"
CLOSURES = "bucket_closures"
MEMBERSHIPS = "bucket_memberships"

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
    IndexSpec(MEMBERSHIPS, (IndexModel([("bucket_id", ASCENDING), ("winner", ASCENDING)]),)),
)


@dataclass(frozen=True)
class Closing:
    """What an attempt to close a bucket came to: its event, a later due time, or nothing to do."""

    event: BucketReady | None = None
    not_before: datetime | None = None


@dataclass(frozen=True)
class Joined:
    """The bucket a file ended up heading for, and when that bucket is due to close."""

    bucket_id: str
    closes_at: datetime


def _now() -> datetime:
    return datetime.now(UTC)


class BucketStore:
    """Bucket operations for the discovery consumer."""

    def __init__(self, database: Database) -> None:
        self._buckets = database.collection(BUCKETS)
        self._files = database.collection(FILES)
        self._closures = database.collection(CLOSURES)
        self._memberships = database.collection(MEMBERSHIPS)

    async def add_file(self, placement: Placement, event: PayloadArrived) -> Joined:
        """Add a file to the open generation of its bucket (idempotent for a redelivered event)."""
        fid = file_id(placement, event)
        async with translated_errors("add file to bucket"):
            bucket = await self._open_generation(placement, event.correlation_id)
            document = {
                "_id": fid,
                "bucket_id": bucket["_id"],
                "arrived_at": _now(),
                "file": event.file.model_dump(mode="json"),
                "dicom": event.dicom.model_dump(mode="json"),
            }
            try:
                await self._files.insert_one(document)
            except Exception as exc:
                if not _is_duplicate(exc):
                    raise
                existing = await self._files.find_one({"_id": fid})
                assert existing is not None
                bucket = await self._bucket(existing["bucket_id"]) or bucket
            bucket = await self._settle_membership(placement, fid, bucket, event.correlation_id)
            due = closes_at(_now(), placement.quiet_period_s)
            await self._buckets.update_one(
                {"_id": bucket["_id"]}, {"$max": {"closes_at": due, "last_file_at": _now()}}
            )
        return Joined(str(bucket["_id"]), max(due, bucket["closes_at"]))

    async def _settle_membership(
        self, placement: Placement, fid: str, bucket: Document, correlation_id: str
    ) -> Document:
        """If the file's bucket started closing, contest the file; move it on while it loses."""
        while await self._closures.find_one({"_id": bucket["_id"]}, {"_id": 1}) is not None:
            if not await self._contest(fid, bucket["_id"], winner="file"):
                return bucket  # the closer took the file into the closing bucket
            bucket = await self._generation(placement, bucket["generation"] + 1, correlation_id)
            await self._files.update_one({"_id": fid}, {"$set": {"bucket_id": bucket["_id"]}})
        return bucket

    async def _contest(self, fid: str, bucket_id: str, winner: str) -> bool:
        """Insert the membership decision for (file, bucket); True when this side won."""
        try:
            await self._memberships.insert_one(
                {"_id": f"{fid}|{bucket_id}", "bucket_id": bucket_id, "file_id": fid, "winner": winner}
            )
            return True
        except Exception as exc:
            if not _is_duplicate(exc):
                raise
            existing = await self._memberships.find_one({"_id": f"{fid}|{bucket_id}"})
            return existing is not None and existing["winner"] == winner

    async def _contest_all(self, fids: list[str], bucket_id: str) -> None:
        """The closer's side of the contest for every file heading here, in one write."""
        if not fids:
            return
        memberships = [
            {"_id": f"{fid}|{bucket_id}", "bucket_id": bucket_id, "file_id": fid, "winner": "closer"}
            for fid in fids
        ]
        try:
            await self._memberships.insert_many(memberships, ordered=False)
        except BulkWriteError as exc:  # files that won their contest first are the ones not inserted
            if any(error.get("code") != DUPLICATE_KEY for error in exc.details.get("writeErrors", [])):
                raise

    async def _open_generation(self, placement: Placement, correlation_id: str) -> Document:
        latest = await self._buckets.find_one({"key": placement.bucket_key}, sort=[("generation", -1)])
        if latest is None:
            return await self._generation(placement, 1, correlation_id)
        if latest["state"] == "open":
            return latest
        return await self._generation(placement, latest["generation"] + 1, correlation_id)

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
            "last_file_at": now,
            "closes_at": closes_at(now, placement.quiet_period_s),
        }
        try:
            await self._buckets.insert_one(document)
            return document
        except Exception as exc:
            if not _is_duplicate(exc):
                raise
        existing = await self._bucket(bucket_id)
        assert existing is not None
        return existing

    async def _bucket(self, bucket_id: str) -> Document | None:
        return await self._buckets.find_one({"_id": bucket_id})

    async def due(self, now: datetime, limit: int = 100) -> list[str]:
        """Open buckets whose quiet period is over."""
        async with translated_errors("find due buckets"):
            cursor = self._buckets.find({"state": "open", "closes_at": {"$lte": now}}, {"_id": 1}).limit(
                limit
            )
            return [str(doc["_id"]) for doc in await cursor.to_list(None)]

    async def close(self, bucket_id: str, now: datetime) -> Closing:
        """Close a due bucket if this caller wins the closure: the event to publish, or why not."""
        async with translated_errors("close bucket"):
            bucket = await self._bucket(bucket_id)
            if bucket is None or bucket["state"] != "open":
                return Closing()
            if bucket["closes_at"] > now:
                return Closing(not_before=bucket["closes_at"])  # a later file moved it
            try:
                await self._closures.insert_one({"_id": bucket_id, "claimed_at": now, "closer": os.getpid()})
            except Exception as exc:
                if _is_duplicate(exc):
                    return Closing()
                raise
            return Closing(event=await self._seal(bucket, now))

    async def _seal(self, bucket: Document, now: datetime) -> BucketReady | None:
        bucket_id = bucket["_id"]
        await self._buckets.update_one({"_id": bucket_id}, {"$set": {"state": "closed", "closed_at": now}})
        heading_here = await self._files.find({"bucket_id": bucket_id}).to_list(None)
        await self._contest_all([document["_id"] for document in heading_here], bucket_id)
        won = await self._memberships.find(
            {"bucket_id": bucket_id, "winner": "closer"}, {"file_id": 1}
        ).to_list(None)
        won_ids = {doc["file_id"] for doc in won}
        files = [document for document in heading_here if document["_id"] in won_ids]
        event = None
        if files:
            placement = _placement(bucket)
            members = [BucketFile.model_validate({"file": f["file"], "dicom": f["dicom"]}) for f in files]
            event = bucket_ready(
                bucket_id, placement, bucket["correlation_id"], members, bucket["opened_at"], now
            )
        await self._closures.update_one(
            {"_id": bucket_id}, {"$set": {"event": event.model_dump(mode="json") if event else None}}
        )
        return event

    async def mark_published(self, bucket_id: str) -> None:
        """Record that the bucket's ``bucket.ready`` was confirmed by the broker."""
        async with translated_errors("mark bucket published"):
            await self._closures.update_one({"_id": bucket_id}, {"$set": {"published_at": _now()}})

    async def unpublished(self, older_than: timedelta, now: datetime) -> list[tuple[str, BucketReady | None]]:
        """Closures whose event was not confirmed in time (the closer died): to finish or re-publish."""
        async with translated_errors("find unpublished closures"):
            query: dict[str, Any] = {"published_at": None, "claimed_at": {"$lte": now - older_than}}
            stale = await self._closures.find(query).to_list(100)
            results: list[tuple[str, BucketReady | None]] = []
            for closure in stale:
                if "event" in closure:
                    event = BucketReady.model_validate(closure["event"]) if closure["event"] else None
                else:  # died before sealing: seal now (contests and memberships are idempotent)
                    bucket = await self._bucket(closure["_id"])
                    event = await self._seal(bucket, closure["claimed_at"]) if bucket else None
                results.append((str(closure["_id"]), event))
            return results


def _placement(bucket: Document) -> Placement:
    return Placement(
        bucket["application"],
        bucket["revision"],
        bucket["grouping_tag"],
        bucket["grouping_value"],
        bucket["quiet_period_s"],
    )


def _is_duplicate(exc: Exception) -> bool:
    from pymongo.errors import DuplicateKeyError

    return isinstance(exc, DuplicateKeyError | Duplicate)
