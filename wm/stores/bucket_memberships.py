"""Who is in a closing bucket, and its outgoing event: collection ``bucket_memberships``.

The closing half of the bucket protocol (``wm.stores.buckets`` describes the whole):

- a membership (``_id`` = file id + bucket id) decides whether a file that joins a bucket while it closes
  is in it. The closer and the late file each try to insert it; exactly one wins.
- the seal (``_id`` = ``seal|<bucket id>``) holds the bucket's ``bucket.ready``. The closer writes its
  memberships and, last in the same ordered insert, the seal: a seal exists only once every member is
  secured, and the event is published only after its seal is stored (an outbox).
"""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Any

import structlog
from prometheus_client import Counter
from pymongo import ASCENDING, IndexModel
from pymongo.errors import BulkWriteError

from schemas.events import BucketFile, BucketReady
from wm.adapters.mongo import DUPLICATE_KEY, Database, Document, IndexSpec, insert_new
from wm.domain.discovery import Placement, after_earlier_generations, bucket_ready

MEMBERSHIPS = "bucket_memberships"
INDEXES = (IndexSpec(MEMBERSHIPS, (IndexModel([("bucket_id", ASCENDING), ("winner", ASCENDING)]),)),)
DUPLICATE_INSTANCES = Counter(
    "mwm_discovery_duplicate_instances_total", "Instances resent after their study's job ran (not run again)"
)
log = structlog.get_logger("wm.stores.buckets")  # the bucket store's own log, as before the split


def seal_id(bucket_id: str) -> str:
    """The ``_id`` of a bucket's seal in ``bucket_memberships``."""
    return f"seal|{bucket_id}"


def membership_id(file_id: str, bucket_id: str) -> str:
    """The ``_id`` of the decision whether a file is in a bucket, in ``bucket_memberships``."""
    return f"{file_id}|{bucket_id}"


def _membership(file_id: str, bucket_id: str, winner: str) -> Document:
    return {
        "_id": membership_id(file_id, bucket_id),
        "bucket_id": bucket_id,
        "file_id": file_id,
        "winner": winner,
    }


class BucketMemberships:
    """The membership decisions and the seals of closing buckets."""

    def __init__(self, database: Database) -> None:
        self._memberships = database.collection(MEMBERSHIPS)

    async def contest(self, fid: str, bucket_id: str, winner: str) -> bool:
        """Insert the membership decision for (file, bucket); True when this side (``winner``) won."""
        if await insert_new(self._memberships, _membership(fid, bucket_id, winner), "contest bucket file"):
            return True
        existing = await self._memberships.find_one({"_id": membership_id(fid, bucket_id)})
        return existing is not None and existing["winner"] == winner

    async def seal(self, bucket: Document, heading_here: list[Document], now: datetime) -> BucketReady | None:
        """Secure every file heading here and store the event in one ordered write (the seal)."""
        bucket_id = bucket["_id"]
        event = await self._event(bucket, heading_here, now)
        memberships = [_membership(doc["_id"], bucket_id, "closer") for doc in heading_here]
        seal = {"_id": seal_id(bucket_id), "bucket_id": bucket_id, "event": _dump(event)}
        try:
            await self._memberships.insert_many([*memberships, seal], ordered=True)
            return event
        except BulkWriteError as exc:  # a file won its contest first, or a seal exists: the slow path
            _raise_unless_duplicates(exc)
            failed = exc.details["writeErrors"][0]["index"]
        return await self._seal_contested(bucket, heading_here, memberships[failed:], now)

    async def _seal_contested(
        self, bucket: Document, heading_here: list[Document], rest: list[Document], now: datetime
    ) -> BucketReady | None:
        bucket_id = bucket["_id"]
        if rest:
            try:
                await self._memberships.insert_many(rest, ordered=False)
            except BulkWriteError as exc:
                _raise_unless_duplicates(exc)
        ids = [membership_id(doc["_id"], bucket_id) for doc in heading_here]
        decided = await asyncio.gather(*(self._memberships.find_one({"_id": mid}) for mid in ids))
        won_ids = {doc["file_id"] for doc in decided if doc is not None and doc["winner"] == "closer"}
        event = await self._event(bucket, [doc for doc in heading_here if doc["_id"] in won_ids], now)
        seal = {"_id": seal_id(bucket_id), "bucket_id": bucket_id, "event": _dump(event)}
        if not await insert_new(self._memberships, seal, "seal bucket"):
            return await self.sealed(bucket_id)  # sealed first elsewhere: that seal is the truth
        return event

    async def _event(self, bucket: Document, files: list[Document], now: datetime) -> BucketReady | None:
        """The bucket's ``bucket.ready`` with these member files (None when it has nothing to run).

        A later generation runs on the whole study when it brings a new instance, and on nothing when it
        only repeats instances an earlier generation ran on (`after_earlier_generations`).
        """
        if not files:
            return None
        files = sorted(files, key=lambda doc: doc["arrived_at"])
        members = [BucketFile.model_validate({"file": f["file"], "dicom": f["dicom"]}) for f in files]
        incomplete = any(f.get("interrupted") for f in files)
        earlier = await self._last_run(bucket)
        if earlier is not None:
            members, duplicates = after_earlier_generations(earlier.files, members)
            incomplete = incomplete or earlier.possibly_incomplete
            if duplicates:
                DUPLICATE_INSTANCES.inc(duplicates)
                log.warning(
                    "resent_instances",
                    bucket_id=bucket["_id"],
                    duplicates=duplicates,
                    new=len(members) - len(earlier.files) if members else 0,
                    runs_again=bool(members),
                )
            if not members:
                return None
        placement = _placement(bucket)
        opened_at, correlation_id = bucket["opened_at"], bucket["correlation_id"]
        return bucket_ready(bucket["_id"], placement, correlation_id, members, opened_at, now, incomplete)

    async def _last_run(self, bucket: Document) -> BucketReady | None:
        """The ``bucket.ready`` of the latest earlier generation that ran (it holds the whole study)."""
        placement = _placement(bucket)
        for generation in range(int(bucket.get("generation", 1)) - 1, 0, -1):
            seal = await self._memberships.find_one({"_id": seal_id(placement.bucket_id(generation))})
            if seal is not None and seal["event"]:
                return BucketReady.model_validate(seal["event"])
        return None

    async def is_sealed(self, bucket_id: str) -> bool:
        """Whether the bucket's seal is stored (its members are decided and its event is kept)."""
        return await self._memberships.find_one({"_id": seal_id(bucket_id)}, {"_id": 1}) is not None

    async def sealed(self, bucket_id: str) -> BucketReady | None:
        """The event a stored seal holds (None: the bucket had nothing to run)."""
        seal = await self._memberships.find_one({"_id": seal_id(bucket_id)})
        assert seal is not None
        return BucketReady.model_validate(seal["event"]) if seal["event"] else None


def _dump(event: BucketReady | None) -> dict[str, Any] | None:
    return event.model_dump(mode="json") if event else None


def _raise_unless_duplicates(exc: BulkWriteError) -> None:
    if any(error.get("code") != DUPLICATE_KEY for error in exc.details.get("writeErrors", [])):
        raise exc


def _placement(bucket: Document) -> Placement:
    return Placement(
        bucket["application"],
        bucket["revision"],
        bucket["grouping_tag"],
        bucket["grouping_value"],
        bucket["quiet_period_s"],
    )
