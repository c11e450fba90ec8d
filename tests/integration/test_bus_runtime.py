"""The bus runtime on the real broker and database: dead letters, redelivery, replicas, drain.

Its tests that stop or restart RabbitMQ, the database or S3 are in the fault suite
(tests/faults/test_bus_outages.py), on a stack of their own.
"""

from __future__ import annotations

import asyncio
import signal

import aio_pika
from prometheus_client import REGISTRY

from devkit.events import payload_arrived
from devkit.services import consumer_log, consumer_processes, queue_settled, wait_for
from schemas.events import PayloadArrived
from tests.support import probe
from tests.support.bus_probe import PROBE, count, dead_letters, declare_probe_queue, running_probe
from wm.adapters.mongo import Database
from wm.adapters.rabbitmq import Bus, queue_name
from wm.config import Settings
from wm.runtime import Consumer, ConsumerRunner, Services, open_services


async def test_poison_messages_are_dead_lettered_with_a_reason_and_the_consumer_goes_on(
    live_settings: Settings,
) -> None:
    settings = live_settings
    async with running_probe(settings), Bus(settings.bus) as bus, Database(settings.mongo) as database:
        event_type = "mwm.payload.arrived.v1"
        for body, message_id in ((b"this is not json", "not-json"), (b'{"payload_id": 7}', "bad-schema")):
            await bus.publish_message(
                aio_pika.Message(
                    body, message_id=message_id, type=event_type, content_type="application/json"
                ),
                "mwm.payload.arrived",
            )
        await bus.publish_message(
            aio_pika.Message(b"{}", message_id="unknown-type", type="mwm.payload.teleported.v9"),
            "mwm.payload.arrived",
        )
        await bus.publish(payload_arrived("reject-this"))
        good = payload_arrived()
        await bus.publish(good)

        async def good_one_handled() -> bool:
            return await count(database, probe.EFFECTS, {"_id": good.payload_id}) == 1

        await wait_for(good_one_handled, 15, "the valid message after the poison ones")
        letters: list[dict[str, object]] = []

        async def four_dead_letters() -> bool:
            letters[:] = await dead_letters(settings)
            return len(letters) == 4

        await wait_for(four_dead_letters, 10, "four dead letters")
    reasons = {letter["message_id"]: str(letter["reason"]) for letter in letters}
    assert "failed validation" in reasons["not-json"] and "Invalid JSON" in reasons["not-json"]
    assert "payload_id" in reasons["bad-schema"]
    assert "unsupported event type 'mwm.payload.teleported.v9'" in reasons["unknown-type"]
    assert any("refused by the probe" in reason for reason in reasons.values())


async def test_sigkill_inside_the_handler_redelivers_to_another_replica_and_the_effect_happens_once(
    live_settings: Settings,
) -> None:
    settings = live_settings
    await declare_probe_queue(settings)
    with consumer_processes(settings, PROBE, count=2, extra_env={"MWM_PROBE_SLEEP_S": "2"}) as replicas:
        async with Bus(settings.bus) as bus, Database(settings.mongo) as database:
            event = payload_arrived()
            await bus.publish(event)

            async def first_attempt_started() -> bool:
                return await count(database, probe.ATTEMPTS) >= 1

            await wait_for(first_attempt_started, 30, "the first attempt")
            first = await database.collection(probe.ATTEMPTS).find_one({})
            assert first is not None
            victim = next(process for process in replicas if process.pid == first["pid"])
            victim.send_signal(signal.SIGKILL)
            victim.wait(timeout=10)

            async def effect_done() -> bool:
                return await count(database, probe.EFFECTS) >= 1

            await wait_for(effect_done, 30, "the effect after the redelivery")
            await queue_settled(queue_name(settings.bus, probe.CONSUMER.name))  # no delivery left to run
            effects = await database.collection(probe.EFFECTS).find({}).to_list(None)
            assert len(effects) == 1
            assert effects[0]["pid"] != victim.pid
            assert await count(database, probe.ATTEMPTS) == 2


async def test_two_replicas_share_the_work_and_sigterm_drains_what_is_in_flight(
    live_settings: Settings,
) -> None:
    settings = live_settings.model_copy(update={"bus": live_settings.bus.model_copy(update={"prefetch": 2})})
    await declare_probe_queue(settings)
    with consumer_processes(settings, PROBE, count=2, extra_env={"MWM_PROBE_SLEEP_S": "0.5"}) as replicas:
        events = [payload_arrived() for _ in range(16)]
        async with Bus(settings.bus) as bus, Database(settings.mongo) as database:
            for event in events:
                await bus.publish(event)

            async def some_work_started_on_both() -> bool:
                pids = await database.collection(probe.ATTEMPTS).distinct("pid")
                return len(pids) == 2

            await wait_for(some_work_started_on_both, 30, "both replicas to take work")
            leaving = replicas[0]
            leaving.send_signal(signal.SIGTERM)
            assert leaving.wait(timeout=30) == 0, consumer_log(settings, leaving)

            async def all_handled() -> bool:
                return await count(database, probe.EFFECTS) == len(events)

            await wait_for(all_handled, 60, "every message, after one replica drained and left")
            effects = await database.collection(probe.EFFECTS).find({}).to_list(None)
            attempts = await database.collection(probe.ATTEMPTS).find({}).to_list(None)
    by_pid = {pid: sum(1 for e in effects if e["pid"] == pid) for pid in (replicas[0].pid, replicas[1].pid)}
    assert all(n > 0 for n in by_pid.values()), by_pid
    started_on_leaver = {a["payload_id"] for a in attempts if a["pid"] == leaving.pid}
    finished_on_leaver = {e["_id"] for e in effects if e["pid"] == leaving.pid}
    assert started_on_leaver == finished_on_leaver, "SIGTERM abandoned a message it had started"
    assert len(attempts) == len(events), "a drained message was handled twice"


async def test_a_handler_in_flight_finishes_its_effects_when_its_channel_closes(
    live_settings: Settings,
) -> None:
    """A broker restart closes the channel under a delivery: its ack is lost, its handler goes on."""
    entered, release, finished = asyncio.Event(), asyncio.Event(), asyncio.Event()
    calls: list[str] = []

    async def slow(event: PayloadArrived, deps: None) -> None:
        calls.append(event.payload_id)
        entered.set()
        await release.wait()
        finished.set()

    def no_deps(services: Services) -> None:
        return None

    consumer: Consumer[None] = Consumer(
        name="inflight",
        routing_keys=(PayloadArrived.event_type,),
        handlers={PayloadArrived: slow},
        build_deps=no_deps,
    )
    handled_before = succeeded("inflight")
    event = payload_arrived()
    async with open_services(live_settings) as services:
        runner = ConsumerRunner(consumer, services)
        await runner.start()
        await services.bus.publish(event)
        await asyncio.wait_for(entered.wait(), 10)

        await services.bus.connection.close()  # every channel closes, as in a broker restart
        release.set()

        await asyncio.wait_for(finished.wait(), 10)
        await runner.stop(drain_timeout_s=5)  # waits for the delivery to be settled (its ack fails)
    assert calls == [event.payload_id]
    assert succeeded("inflight") == handled_before + 1, "the delivery was not settled as handled"


def succeeded(consumer: str) -> float:
    """Deliveries of ``consumer`` whose handler succeeded (counted before the ack, which may be lost)."""
    return REGISTRY.get_sample_value("mwm_messages_succeeded_total", {"consumer": consumer}) or 0.0
