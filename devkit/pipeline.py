"""Helpers for pipeline tests: register applications, feed files, tap the events MWM publishes."""

from __future__ import annotations

import asyncio
import json
import sys
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aio_pika

from devkit.services import REPO, wait_for
from schemas.events import EVENTS_BY_TYPE_NAME, DicomIdentifiers, Event, PayloadArrived
from wm.adapters.mongo import Database
from wm.adapters.objectstore import ObjectStore
from wm.adapters.rabbitmq import Bus, queue_name
from wm.config import Settings
from wm.dicom import object_key, read_identifiers
from wm.registry import Registry, engine_validator
from wm.runtime import Consumer, run_consumers

MIP_APP = REPO / "examples" / "mip" / "app.py"


def mip_application(
    name: str = "mip",
    ae_title: str = "MWM-MIP",
    quiet_period_s: float = 1.0,
    sinks: Sequence[str] = (),
    command: Sequence[str] | None = None,
) -> dict[str, Any]:
    """The example application's definition, with the absolute path of its program."""
    return {
        "name": name,
        "version": "1.0.0",
        "ae_titles": [ae_title],
        "discovery": {"quiet_period_s": quiet_period_s, "filters": {"modalities": ["CT"]}},
        "map": {"command": list(command or ["python", str(MIP_APP)]), "timeout_s": 120},
        "engine": {"name": "local"},
        "sinks": list(sinks),
    }


async def register(settings: Settings, definition: dict[str, Any]) -> None:
    """Register an application (and map its AE titles) through the registry."""
    async with Database(settings.mongo) as database:
        await Registry(database, engine_validator(settings)).register(definition)


class EventTap:
    """Every event published on the given routing keys while the tap is open, decoded."""

    def __init__(self) -> None:
        self.queue = ""  # the tap's own queue: ``queue_settled(tap.queue)`` waits until all arrived
        self.events: list[Event] = []
        self.message_ids: list[str | None] = []
        self.received_at: list[float] = []  # time.time() at each arrival, for latency measurements

    def of(self, kind: type[Event]) -> list[Any]:
        """The events of one type, in arrival order."""
        return [event for event in self.events if isinstance(event, kind)]

    async def wait_for(self, kind: type[Event], count: int, timeout: float) -> list[Any]:
        """Wait until ``count`` events of ``kind`` arrived; returns them."""

        async def enough() -> bool:
            return len(self.of(kind)) >= count

        await wait_for(enough, timeout, f"{count} {kind.__name__} event(s)")
        return self.of(kind)


@asynccontextmanager
async def bound_queue(settings: Settings, *routing_keys: str) -> AsyncIterator[aio_pika.abc.AbstractQueue]:
    """An exclusive queue of the caller's own, bound to ``routing_keys`` on the event exchange."""
    connection = await aio_pika.connect(settings.bus.url)
    async with connection:
        channel = await connection.channel()
        exchange = await channel.declare_exchange(
            settings.bus.exchange, aio_pika.ExchangeType.TOPIC, durable=True
        )
        queue = await channel.declare_queue(exclusive=True)
        for key in routing_keys:
            await queue.bind(exchange, key)
        yield queue


@asynccontextmanager
async def tap(settings: Settings, *routing_keys: str) -> AsyncIterator[EventTap]:
    """Every event published on ``routing_keys`` while the block runs, decoded (``EventTap``)."""
    collected = EventTap()
    async with bound_queue(settings, *routing_keys) as queue:
        collected.queue = queue.name

        async def collect(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            received = time.time()
            async with message.process():
                kind = EVENTS_BY_TYPE_NAME[message.type or ""]
                collected.events.append(kind.model_validate(json.loads(message.body)))
                collected.message_ids.append(message.message_id)
                collected.received_at.append(received)

        await queue.consume(collect)
        yield collected


@asynccontextmanager
async def consumers_running(settings: Settings, consumers: Sequence[Consumer[Any]]) -> AsyncIterator[None]:
    """The consumers running in this process for the duration of the block.

    Their queues and bindings are declared first (as ``mwm topology declare`` does in a deployment), so
    events published inside the block are routed even before the consumers are up.
    """
    for consumer in consumers:
        async with Bus(consumer.bus_settings(settings)) as bus:
            await bus.declare_consumer_queue(bus.channel, consumer.name, consumer.bindings(settings))
    stop = asyncio.Event()
    task = asyncio.create_task(run_consumers(settings, list(consumers), stop=stop))
    try:
        yield
    finally:
        stop.set()
        await task


async def wait_until_consuming(
    settings: Settings, consumers: Sequence[Consumer[Any]], timeout: float = 60
) -> None:
    """Wait until every consumer's queue has a consumer, so what is published next meets a running one."""
    connection = await aio_pika.connect(settings.bus.url)
    async with connection:
        channel = await connection.channel()

        async def all_consuming() -> bool:
            for consumer in consumers:
                queue = await channel.declare_queue(queue_name(settings.bus, consumer.name), passive=True)
                if not queue.declaration_result.consumer_count:
                    return False
            return True

        await wait_for(all_consuming, timeout, f"consumers {[consumer.name for consumer in consumers]}")


async def arrive(
    settings: Settings,
    files: Sequence[Path],
    *,
    called_ae: str,
    calling_ae: str = "MODALITY",
    payload_id: str | None = None,
) -> list[PayloadArrived]:
    """Store files as a gateway would and publish one payload.arrived per file."""
    payload_id = payload_id or uuid.uuid4().hex
    events = []
    async with ObjectStore(settings.object_store) as objects, Bus(settings.bus) as bus:
        for path in files:
            dicom: DicomIdentifiers = read_identifiers(path)
            ref = await objects.put_file(object_key(payload_id, dicom), path)
            event = PayloadArrived(
                correlation_id=payload_id,
                payload_id=payload_id,
                file=ref,
                dicom=dicom,
                calling_ae_title=calling_ae,
                called_ae_title=called_ae,
                source="dimse",
            )
            await bus.publish(event)
            events.append(event)
    return events


def consumer_command(name: str) -> list[str]:
    """The command line of one consumer process."""
    return [sys.executable, "-m", "wm", "consume", name]
