"""``mwm dlq``: operators list, inspect and replay dead letters with the real command."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import aio_pika

from devkit.events import payload_arrived
from devkit.pipeline import consumers_running
from devkit.services import REPO, settings_env, wait_for
from tests.support import probe
from wm.adapters.mongo import Database
from wm.adapters.rabbitmq import Bus
from wm.config import Settings
from wm.metrics import DEAD_LETTERED


def mwm(settings: Settings, *args: str) -> list[dict[str, object]]:
    result = subprocess.run(
        [sys.executable, "-m", "wm", "dlq", *args, "--output", "json"],
        cwd=REPO,
        env=settings_env(settings),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    rows: list[dict[str, object]] = json.loads(result.stdout)
    return rows


async def test_a_dead_letter_is_listed_shown_with_its_reason_and_replayed_to_its_consumer_only(
    live_settings: Settings,
) -> None:
    settings = live_settings
    async with consumers_running(settings, [probe.CONSUMER]), Bus(settings.bus) as bus:
        await bus.publish_message(
            aio_pika.Message(b"{}", message_id="broken", type="mwm.payload.arrived.v1"), "mwm.payload.arrived"
        )

        async def dead_lettered() -> bool:
            return mwm(settings, "list", "probe")[0]["messages"] == 1

        await wait_for(dead_lettered, 20, "the dead letter")
    [shown] = mwm(settings, "show", "probe")
    assert shown["message_id"] == "broken" and "failed validation" in str(shown["reason"])
    assert mwm(settings, "list", "probe")[0]["messages"] == 1, "show leaves the message in place"

    good = payload_arrived()
    async with Bus(settings.bus) as bus:  # a replayable letter: a valid event the probe refused earlier
        channel = await bus.connection.channel()
        await channel.default_exchange.publish(
            aio_pika.Message(
                good.model_dump_json().encode(),
                message_id="fixed",
                type=good.type_name(),
                content_type="application/json",
                headers={"x-mwm-reason": "was broken"},
            ),
            routing_key=f"{settings.bus.queue_prefix}.probe.dead-letter",
        )
    replayed = mwm(settings, "replay", "probe", "--message-id", "fixed")
    assert [row["message_id"] for row in replayed] == ["fixed"]
    async with consumers_running(settings, [probe.CONSUMER]), Database(settings.mongo) as database:

        async def handled() -> bool:
            return await database.collection(probe.EFFECTS).count_documents({"_id": good.payload_id}) == 1

        await wait_for(handled, 20, "the replayed message to be handled")
    assert [row["message_id"] for row in mwm(settings, "show", "probe")] == ["broken"]


def dead_lettered_count(consumer: str) -> float:
    return sum(
        sample.value
        for metric in DEAD_LETTERED.collect()
        for sample in metric.samples
        if sample.name.endswith("_total") and sample.labels["consumer"] == consumer
    )


async def test_a_replay_takes_a_snapshot_and_replays_each_poison_message_once(
    live_settings: Settings,
) -> None:
    # Issue #18: 5 dead letters replayed while their consumer runs used to come back and be replayed again
    # until --limit (100 rows, the counter from 5 to 105).
    settings = live_settings
    poison = [payload_arrived(payload_id=f"reject-{index}") for index in range(5)]
    async with consumers_running(settings, [probe.CONSUMER]), Bus(settings.bus) as bus:
        for event in poison:
            await bus.publish(event, message_id=event.payload_id)

        async def dead_letters(count: int) -> bool:
            rows = await asyncio.to_thread(mwm, settings, "list", "probe")
            return rows[0]["messages"] == count

        await wait_for(lambda: dead_letters(5), 30, "5 dead letters", interval=0.5)
        before = dead_lettered_count("probe")
        replayed = await asyncio.to_thread(mwm, settings, "replay", "probe")
        assert sorted(str(row["message_id"]) for row in replayed) == sorted(e.payload_id for e in poison)
        assert all(row["replayed"] for row in replayed)

        async def counted_again() -> bool:
            return dead_lettered_count("probe") >= before + 5

        await wait_for(counted_again, 30, "the replayed messages to be dead-lettered again")
        await wait_for(lambda: dead_letters(5), 30, "5 dead letters again", interval=0.5)
        assert dead_lettered_count("probe") == before + 5
