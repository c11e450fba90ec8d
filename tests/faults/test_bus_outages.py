"""The bus runtime through outages of the services it depends on: a broker restart, a database outage
short and lasting, a consumer started while the database or S3 is down (moved from
tests/integration/test_bus_runtime.py: they stop and restart services, so they run on the fault suite's
own stack, ``scripts/faults``)."""

from __future__ import annotations

import asyncio

import pytest

from devkit.events import payload_arrived
from devkit.services import consumer_log, consumer_processes, services_command, wait_for
from tests.support import probe
from tests.support.bus_probe import PROBE, count, dead_letters, declare_probe_queue, running_probe
from wm.adapters.mongo import Database
from wm.adapters.rabbitmq import Bus
from wm.config import Settings


async def test_consumers_resume_by_themselves_after_a_broker_restart_and_lose_nothing(
    live_settings: Settings,
) -> None:
    settings = live_settings
    await declare_probe_queue(settings)
    with consumer_processes(settings, PROBE, count=1, extra_env={"MWM_PROBE_SLEEP_S": "0.05"}):
        before = [payload_arrived() for _ in range(30)]
        async with Bus(settings.bus) as bus:
            for event in before:
                await bus.publish(event)
        services_command("restart", "rabbitmq")
        after = [payload_arrived() for _ in range(30)]
        async with Bus(settings.bus) as bus:
            for event in after:
                await bus.publish(event)
        async with Database(settings.mongo) as database:

            async def all_handled() -> bool:
                return await count(database, probe.EFFECTS) == len(before) + len(after)

            await wait_for(all_handled, 60, "every message published before and after the restart")
            handled = {doc["_id"] for doc in await database.collection(probe.EFFECTS).find({}).to_list(None)}
    assert handled == {event.payload_id for event in before + after}


async def test_a_short_database_outage_is_ridden_out_and_a_lasting_one_ends_in_the_dead_letter_queue(
    live_settings: Settings,
) -> None:
    settings = live_settings.model_copy(
        update={"retry": live_settings.retry.model_copy(update={"attempts": 8, "max_delay_s": 2.0})}
    )
    async with running_probe(settings), Bus(settings.bus) as bus, Database(settings.mongo) as database:
        services_command("stop", "mongo")
        try:
            survivors = [payload_arrived() for _ in range(5)]
            for event in survivors:
                await bus.publish(event)
            await asyncio.sleep(2.0)  # the outage: handlers are retrying meanwhile
        finally:
            services_command("start", "mongo")

        async def survivors_handled() -> bool:
            return await count(database, probe.EFFECTS) == len(survivors)

        await wait_for(survivors_handled, 60, "the messages published during a short outage")
        assert await dead_letters(settings) == []

        services_command("stop", "mongo")
        try:
            doomed = payload_arrived()
            await bus.publish(doomed)
            letters: list[dict[str, object]] = []

            async def dead_lettered() -> bool:
                letters[:] = await dead_letters(settings)
                return len(letters) == 1

            await wait_for(dead_lettered, 90, "the message to be dead-lettered after its attempts")
        finally:
            services_command("start", "mongo")
    assert letters[0]["message_id"] is not None
    assert "transient failure persisted after 8 attempts" in str(letters[0]["reason"])


@pytest.mark.parametrize("service", ["mongo", "s3"])
async def test_a_consumer_started_while_a_service_is_down_waits_for_it(
    live_settings: Settings, service: str
) -> None:
    settings = live_settings.model_copy(
        update={"retry": live_settings.retry.model_copy(update={"attempts": 12, "max_delay_s": 1.0})}
    )
    await declare_probe_queue(settings)
    services_command("stop", service)
    try:
        with consumer_processes(settings, PROBE, count=1) as [replica]:

            async def retried_twice() -> bool:
                return consumer_log(settings, replica).count("retrying") >= 2

            await wait_for(retried_twice, 30, f"the consumer to retry opening {service}")
            assert replica.poll() is None, f"the consumer gave up: {consumer_log(settings, replica)}"
            services_command("start", service)
            event = payload_arrived()
            async with Bus(settings.bus) as bus, Database(settings.mongo) as database:
                await bus.publish(event)

                async def handled() -> bool:
                    return await count(database, probe.EFFECTS, {"_id": event.payload_id}) == 1

                await wait_for(handled, 60, "the consumer to come up and handle a message")
    finally:
        services_command("start", service)
