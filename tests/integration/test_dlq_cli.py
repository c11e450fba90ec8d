"""``mwm dlq``: operators list, inspect and replay dead letters with the real command."""

from __future__ import annotations

import json
import subprocess
import sys

import aio_pika

from tests.support import probe
from tests.support.events import payload_arrived
from tests.support.pipeline import consumers_running
from tests.support.services import REPO, settings_env, wait_for
from wm.adapters.mongo import Database
from wm.adapters.rabbitmq import Bus
from wm.config import Settings


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
