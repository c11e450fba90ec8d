"""The quiet-period timer: precise in memory, durable in the database.

Each discovery replica arms an in-memory timer for the buckets its files joined, so a bucket closes within
milliseconds of its quiet period. The timer state that matters lives in MongoDB (``closes_at`` of every
open bucket, mirrored on the watch list of open buckets), and every replica also sweeps that list for due
buckets every ``sweep_interval_s``: when
the replica that armed a timer dies, or everything restarts, the sweep closes the bucket. Whoever closes it,
the closure is decided by a unique insert (``wm.stores.buckets``), so ``bucket.ready`` is published once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog
from pymongo import IndexModel

from schemas.events import BucketReady
from wm.adapters.mongo import Database, IndexSpec, insert_new
from wm.errors import TransientError
from wm.ports import EventPublisher
from wm.service_layer.periodic import every
from wm.stores.buckets import BucketStore

log = structlog.get_logger("wm.service_layer.timers")

RETRIES = "bucket_closure_retries"
CONCURRENT_CLOSURES = 16
INDEXES = (IndexSpec(RETRIES, (IndexModel("bucket_id"),)),)


class BucketTimers:
    """Closes buckets when their quiet period ends and publishes their ``bucket.ready``."""

    def __init__(
        self,
        store: BucketStore,
        publisher: EventPublisher,
        database: Database,
        sweep_interval_s: float = 1.0,
        publish_lease_s: float = 10.0,
    ) -> None:
        self._store = store
        self._publisher = publisher
        self._retries = database.collection(RETRIES)
        self._sweep_interval = sweep_interval_s
        self._lease = timedelta(seconds=publish_lease_s)
        self._armed: dict[str, datetime] = {}
        self._wake = asyncio.Event()
        self._closing = asyncio.Semaphore(CONCURRENT_CLOSURES)
        self._closures: set[asyncio.Task[None]] = set()

    def arm(self, bucket_id: str, due: datetime) -> None:
        """Close ``bucket_id`` at ``due`` unless more files move it later."""
        current = self._armed.get(bucket_id)
        if current is None or due > current:
            self._armed[bucket_id] = due
            self._wake.set()

    async def run(self, stop: asyncio.Event) -> None:
        """Fire armed timers on time and sweep the database, until ``stop`` is set.

        Two loops, so a slow sweep never delays a timer that is due; a due timer's closure runs as a task of
        its own, so a slow closure never delays the next timer either.
        """
        await asyncio.gather(self._fire_timers(stop), self._sweep_periodically(stop))
        await asyncio.gather(*self._closures)

    async def _fire_timers(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self._fire_due()
            await self._sleep_until_next(stop)

    async def _sweep_periodically(self, stop: asyncio.Event) -> None:
        watching = False

        async def sweep() -> None:
            nonlocal watching
            if not watching:  # once per start, retried while the database is out
                watching = await self._watch_open()
            await self._guarded(self._sweep())

        await every(self._sweep_interval, stop, sweep, "bucket_sweep")

    async def _sleep_until_next(self, stop: asyncio.Event) -> None:
        soonest = min(self._armed.values(), default=None)
        delay = 3600.0 if soonest is None else (soonest - datetime.now(UTC)).total_seconds()
        self._wake.clear()
        waiters = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(self._wake.wait())]
        await asyncio.wait(waiters, timeout=max(delay, 0.0), return_when=asyncio.FIRST_COMPLETED)
        for waiter in waiters:
            waiter.cancel()

    async def _watch_open(self) -> bool:
        try:
            repaired = await self._store.watch_open()
        except TransientError as exc:
            log.warning("bucket_watch_deferred", error=str(exc))
            return False
        if repaired:
            log.warning("unwatched_buckets_watched", buckets=repaired)
        return True

    async def _guarded(self, work: Coroutine[Any, Any, None]) -> None:
        try:
            await work
        except TransientError as exc:
            log.warning("bucket_timer_deferred", error=str(exc))
        except Exception as exc:  # a bug: say so loudly, but never stop closing the other buckets
            log.exception("bucket_timer_failed", error=repr(exc))

    def _fire_due(self) -> None:
        now = datetime.now(UTC)
        due = [bucket_id for bucket_id, at in self._armed.items() if at <= now]
        for bucket_id in due:
            del self._armed[bucket_id]
            closure = asyncio.create_task(self._close_bounded(bucket_id, now))
            self._closures.add(closure)
            closure.add_done_callback(self._closures.discard)

    async def _sweep(self) -> None:
        now = datetime.now(UTC)
        await self._close_all(await self._store.due(now - timedelta(seconds=self._sweep_interval)), now)
        for bucket_id, event in await self._store.unpublished(self._lease, now):
            if await self._claim_retry(bucket_id, now):
                log.warning("bucket_ready_republished", bucket_id=bucket_id)
                await self._publish(bucket_id, event)

    async def _close_all(self, bucket_ids: list[str], now: datetime) -> None:
        """Close due buckets concurrently: one slow closure must not hold back the others."""
        await asyncio.gather(*(self._close_bounded(bucket_id, now) for bucket_id in bucket_ids))

    async def _close_bounded(self, bucket_id: str, now: datetime) -> None:
        async with self._closing:
            await self._guarded(self._close(bucket_id, now))

    async def _close(self, bucket_id: str, now: datetime) -> None:
        closing = await self._store.close(bucket_id, now)
        if closing.not_before is not None:
            self.arm(bucket_id, closing.not_before)  # a file (maybe on another replica) moved it
        if closing.closed:
            await self._publish(bucket_id, closing.event)

    async def _publish(self, bucket_id: str, event: BucketReady | None) -> None:
        if event is not None:
            await self._publisher.publish(event, message_id=bucket_id)
            delay_ms = (datetime.now(UTC) - event.closed_at).total_seconds() * 1000
            log.info(
                "bucket_ready_published",
                bucket_id=bucket_id,
                files=len(event.files),
                application_id=event.application_id,
                correlation_id=event.correlation_id,
                publish_delay_ms=round(delay_ms, 1),
            )
        await self._store.mark_published(bucket_id)

    async def _claim_retry(self, bucket_id: str, now: datetime) -> bool:
        """One replica per lease period may re-publish a stale closure."""
        window = int(now.timestamp() // self._lease.total_seconds())
        claim = {"_id": f"{bucket_id}@{window}", "bucket_id": bucket_id}
        return await insert_new(self._retries, claim, "claim closure retry")
