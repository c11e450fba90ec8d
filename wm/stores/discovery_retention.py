"""Retention of discovery's documents and of the received files (``payloads/``), for ``mwm cleanup``.

A bucket key (application revision + grouping value) is removed whole: every generation's bucket, file,
slot, closure, membership and seal documents, its watch entries and closure-retry claims, and the payload
objects its files point to, once *every* generation closed before the cutoff and no job made from one of
them is still unfinished. Removing generations one by one would let discovery reopen an old generation
number (it walks generations from the first); a removed key leaves a one-line ``bucket_keys`` document
with the next generation number, written before anything is removed, so a study sent again later opens a
new bucket id (and job id) rather than an old one.

Payload objects no file document points to (files refused or aborted mid-association, a gateway that died
before publishing) are removed once older than the cutoff. A payload object a kept bucket's file points to
stays, whatever its age.

These reads scan whole collections on the MongoDB-wire server; cleanup runs off the hot paths (by hand or
a CronJob), once per run.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from wm.adapters.mongo import Database, Document, delete_matching, translated_errors
from wm.adapters.objectstore import ObjectStore
from wm.domain.jobs import TERMINAL, job_id_for
from wm.service_layer import timers
from wm.stores import bucket_index, buckets
from wm.stores.jobs import JOBS

PAYLOADS = "payloads/"
CHUNK = 500
"""Bucket ids per delete (bounds the size of one ``$in``)."""
ENDED = frozenset(state.value for state in TERMINAL)


@dataclass
class DiscoveryRemoved:
    """What discovery retention removed (or, in a dry run, would remove)."""

    bucket_keys: int = 0
    documents: int = 0
    payload_objects: int = 0


def _chunks(items: Sequence[str]) -> Iterator[list[str]]:
    for start in range(0, len(items), CHUNK):
        yield list(items[start : start + CHUNK])


class DiscoveryRetention:
    """Removes whole bucket keys past the retention, and the payloads nothing needs."""

    def __init__(self, database: Database, objects: ObjectStore) -> None:
        self._database = database
        self._objects = objects

    async def clean_up(self, cutoff: datetime, dry_run: bool = False) -> DiscoveryRemoved:
        """Remove what is past ``cutoff`` (``dry_run``: count only)."""
        removed = DiscoveryRemoved()
        async with translated_errors("read buckets for retention"):
            all_buckets = (
                await self._collection(buckets.BUCKETS)
                .find({}, {"key": 1, "generation": 1, "state": 1, "closed_at": 1})
                .to_list(None)
            )
        by_key: dict[str, list[Document]] = defaultdict(list)
        for bucket in all_buckets:
            by_key[bucket["key"]].append(bucket)
        expired = [key for key, generations in by_key.items() if await self._expired(generations, cutoff)]
        ids = [str(bucket["_id"]) for key in expired for bucket in by_key[key]]
        expired_ids = set(ids)
        kept_payloads, expired_payloads = await self._payload_keys(expired_ids)
        removed.bucket_keys = len(expired)
        if not dry_run:
            for key in expired:
                await self._tombstone(key, max(int(b["generation"]) for b in by_key[key]) + 1)
        for chunk in _chunks(ids):
            removed.documents += await self._remove_documents(chunk, dry_run)
        orphans = [
            key
            for key in await self._objects.keys_older_than(PAYLOADS, cutoff)
            if key not in kept_payloads and key not in expired_payloads
        ]
        doomed = sorted(expired_payloads | set(orphans))
        removed.payload_objects = len(doomed) if dry_run else await self._objects.remove_keys(doomed)
        return removed

    async def _expired(self, generations: list[Document], cutoff: datetime) -> bool:
        """Every generation closed before ``cutoff``, and no job made from one still running."""
        for bucket in generations:
            closed_at = bucket.get("closed_at")
            if bucket.get("state") != "closed" or closed_at is None or closed_at >= cutoff:
                return False
        for bucket in generations:
            async with translated_errors("read job for retention"):
                job = await self._collection(JOBS).find_one({"_id": job_id_for(bucket["_id"])}, {"state": 1})
            if job is not None and job["state"] not in ENDED:
                return False
        return True

    async def _payload_keys(self, expired_ids: set[str]) -> tuple[set[str], set[str]]:
        """Payload keys the kept buckets' files point to, and those only expired buckets' files point to."""
        async with translated_errors("read bucket files for retention"):
            files = (
                await self._collection(buckets.FILES).find({}, {"bucket_id": 1, "file.key": 1}).to_list(None)
            )
        kept: set[str] = set()
        expired: set[str] = set()
        for file in files:
            (expired if file["bucket_id"] in expired_ids else kept).add(str(file["file"]["key"]))
        return kept, expired - kept

    async def _tombstone(self, key: str, next_generation: int) -> None:
        async with translated_errors("record removed bucket key"):
            await self._collection(buckets.KEYS).update_one(
                {"_id": key}, {"$max": {"next_generation": next_generation}}, upsert=True
            )

    async def _remove_documents(self, bucket_ids: list[str], dry_run: bool) -> int:
        """Every discovery document of these buckets; the buckets themselves last (a crash: run again)."""
        by_bucket: dict[str, Any] = {"bucket_id": {"$in": bucket_ids}}
        by_id: dict[str, Any] = {"_id": {"$in": bucket_ids}}
        targets = [
            (buckets.MEMBERSHIPS, by_bucket),
            (bucket_index.SLOTS, by_bucket),
            (buckets.FILES, by_bucket),
            (timers.RETRIES, by_bucket),
            (buckets.CLOSURES, by_id),
            (bucket_index.WATCH, by_id),
            (buckets.BUCKETS, by_id),
        ]
        count = 0
        for name, criteria in targets:
            count += await delete_matching(self._collection(name), criteria, f"purge {name}", dry_run)
        return count

    def _collection(self, name: str) -> Any:
        return self._database.collection(name)
