"""The fleet gauges: what the whole deployment holds, read from the database and the broker at scrape time.

Jobs and export tasks by state, the age of the oldest unfinished job and export task, and each consumer
queue's depth, consumers and dead letters (`wm.metrics`). The API process refreshes them before rendering
``/metrics``, at most once per ``MIN_INTERVAL_S`` (a scrape from each of several Prometheus servers costs
one round of queries). A source that is down leaves its gauges at their last value and counts
``mwm_fleet_scrape_errors_total{source}``: the per-process ``mwm_bus_connected`` and ``/readyz`` report
the outage itself.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib.metadata import entry_points
from typing import Any

import aio_pika
import structlog

from wm import metrics
from wm.adapters.mongo import Database
from wm.adapters.rabbitmq import Bus, dead_letter_queue_name, queue_name
from wm.domain.exports import OPEN_STATES, ExportState
from wm.domain.jobs import TERMINAL, JobState
from wm.stores.exports import EXPORT_TASKS
from wm.stores.jobs import JOBS

log = structlog.get_logger("wm.fleet")

MIN_INTERVAL_S = 5.0
CONSUMER_GROUP = "mwm.consumers"


def consumer_names() -> list[str]:
    """The registered consumers (the ``mwm.consumers`` entry points)."""
    return sorted(ep.name for ep in entry_points(group=CONSUMER_GROUP))


@dataclass
class FleetGauges:
    """Refreshes the fleet gauges from ``database`` and ``bus``; call `refresh` before each scrape."""

    database: Database
    bus: Bus
    consumers: list[str] = field(default_factory=consumer_names)
    _refreshed_at: float = field(default=float("-inf"), init=False)
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock, init=False)

    async def refresh(self) -> None:
        async with self._lock:
            if time.monotonic() - self._refreshed_at < MIN_INTERVAL_S:
                return
            self._refreshed_at = time.monotonic()
            await asyncio.gather(self._refresh_database(), self._refresh_queues())

    async def _refresh_database(self) -> None:
        try:
            now = datetime.now(UTC)
            unfinished_jobs = [state.value for state in JobState if state not in TERMINAL]
            await self._by_state(JOBS, [state.value for state in JobState], metrics.JOBS)
            await self._by_state(EXPORT_TASKS, [state.value for state in ExportState], metrics.EXPORT_TASKS)
            for kind, collection, open_states in (
                ("job", JOBS, unfinished_jobs),
                ("export", EXPORT_TASKS, [state.value for state in OPEN_STATES]),
            ):
                oldest = await self._oldest(collection, open_states)
                age = 0.0 if oldest is None else max((now - oldest).total_seconds(), 0.0)
                metrics.OLDEST_UNFINISHED.labels(kind).set(age)
        except Exception as exc:
            metrics.FLEET_SCRAPE_ERRORS.labels("database").inc()
            log.warning("fleet_gauges_failed", source="database", error=repr(exc))

    async def _by_state(self, collection: str, states: list[str], gauge: Any) -> None:
        counts = await asyncio.gather(
            *(self.database.collection(collection).count_documents({"state": state}) for state in states)
        )
        for state, count in zip(states, counts, strict=True):
            gauge.labels(state).set(count)

    async def _oldest(self, collection: str, states: list[str]) -> datetime | None:
        cursor = self.database.collection(collection).find({"state": {"$in": states}}, {"created_at": 1})
        documents = await cursor.sort("created_at", 1).limit(1).to_list(1)
        if not documents:
            return None
        created: datetime = documents[0]["created_at"]
        return created if created.tzinfo else created.replace(tzinfo=UTC)

    async def _refresh_queues(self) -> None:
        try:
            channel = await self.bus.connection.channel()
        except Exception as exc:
            metrics.FLEET_SCRAPE_ERRORS.labels("broker").inc()
            log.warning("fleet_gauges_failed", source="broker", error=repr(exc))
            return
        try:
            for consumer in self.consumers:
                settings = self.bus.settings
                main = await _depth(channel, queue_name(settings, consumer))
                if main is not None:
                    metrics.QUEUE_MESSAGES.labels(consumer).set(main[0])
                    metrics.QUEUE_CONSUMERS.labels(consumer).set(main[1])
                dead = await _depth(channel, dead_letter_queue_name(settings, consumer))
                if dead is not None:
                    metrics.DEAD_LETTERS.labels(consumer).set(dead[0])
        except Exception as exc:
            metrics.FLEET_SCRAPE_ERRORS.labels("broker").inc()
            log.warning("fleet_gauges_failed", source="broker", error=repr(exc))
        finally:
            if not channel.is_closed:
                await channel.close()


async def _depth(channel: aio_pika.abc.AbstractChannel, name: str) -> tuple[int, int] | None:
    """(messages, consumers) of a queue; None when it is not declared yet (no consumer ever ran)."""
    try:
        declared = await channel.declare_queue(name, passive=True)
    except aio_pika.exceptions.ChannelClosed:
        # A passive declare of a missing queue closes the channel: reopen it for the next queue.
        await channel.reopen()
        return None
    result = declared.declaration_result
    return int(result.message_count or 0), int(result.consumer_count or 0)
