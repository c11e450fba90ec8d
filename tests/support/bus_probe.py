"""The probe consumer (`tests.support.probe`) as the bus-runtime tests drive it: in this process, its
queue, its dead letters, its records (tests/integration/test_bus_runtime.py and, through outages,
tests/faults/test_bus_outages.py)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from tests.support import probe
from wm.adapters.mongo import Database
from wm.adapters.rabbitmq import Bus, dead_letter_queue_name, describe_dead_letter
from wm.config import Settings
from wm.runtime import run_consumers

PROBE = "tests.support.probe:CONSUMER"
"""The probe as ``mwm consume`` names it (for `devkit.services.consumer_processes`)."""


@asynccontextmanager
async def running_probe(settings: Settings) -> AsyncIterator[None]:
    """The probe consumer running in this process until the block ends."""
    stop = asyncio.Event()
    task = asyncio.create_task(run_consumers(settings, [probe.CONSUMER], stop=stop))
    try:
        await declare_probe_queue(settings)
        yield
    finally:
        stop.set()
        await task


async def declare_probe_queue(settings: Settings) -> None:
    """The probe's queue, bound, so that what is published before a replica starts waits for it."""
    async with Bus(settings.bus) as bus:
        await bus.declare_consumer_queue(bus.channel, "probe", probe.CONSUMER.routing_keys)


async def dead_letters(settings: Settings) -> list[dict[str, object]]:
    """Everything in the probe's dead-letter queue (left in place)."""
    async with Bus(settings.bus) as bus:
        channel = await bus.connection.channel()
        queue = await channel.declare_queue(dead_letter_queue_name(settings.bus, "probe"), passive=True)
        found, held = [], []
        while (message := await queue.get(no_ack=False, fail=False)) is not None:
            held.append(message)
            found.append(dict(describe_dead_letter(message)))
        for message in held:
            await message.nack(requeue=True)
        await channel.close()
    return found


async def count(database: Database, collection: str, query: dict[str, object] | None = None) -> int:
    """How many of the probe's records (``probe.ATTEMPTS``, ``probe.EFFECTS``) match ``query``."""
    return await database.collection(collection).count_documents(query or {})
