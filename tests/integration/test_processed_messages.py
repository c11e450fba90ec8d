"""Processed-message keys on the real MongoDB-wire server: written behind the ack, never lost on flush."""

from __future__ import annotations

import asyncio

from prometheus_client import REGISTRY

from devkit.services import wait_for
from wm.adapters.mongo import PROCESSED_MESSAGES, PROCESSED_MESSAGES_INDEXES, Database, ProcessedMessages
from wm.config import Settings


def unwritten_keys() -> float:
    return REGISTRY.get_sample_value("mwm_processed_keys_unwritten_total") or 0.0


async def test_keys_recorded_concurrently_are_all_written_once_flushed(live_settings: Settings) -> None:
    async with Database(live_settings.mongo, (PROCESSED_MESSAGES_INDEXES,)) as database:
        processed = ProcessedMessages(database, batch_size=64)
        ids = [f"m-{n}" for n in range(300)]
        await asyncio.gather(*(processed.record("scheduler", message_id) for message_id in ids))
        await processed.record("scheduler", "m-0")  # a second record of a key is harmless
        await processed.flush()

        stored = await database.collection(PROCESSED_MESSAGES).distinct("_id")
        assert sorted(stored) == sorted(f"scheduler:{message_id}" for message_id in ids)
        assert await processed.seen("scheduler", "m-299")
        assert not await processed.seen("monitor", "m-299")  # keys are per consumer


async def test_keys_arriving_steadily_share_a_write_that_follows_as_soon_as_they_stop(
    live_settings: Settings,
) -> None:
    async with Database(live_settings.mongo, (PROCESSED_MESSAGES_INDEXES,)) as database:
        processed = ProcessedMessages(database, linger_s=60.0)  # a pause of 6 s ends the wait
        for n in range(20):
            await processed.record("scheduler", f"k-{n}")
            await asyncio.sleep(0.01)
        assert not await processed.seen("scheduler", "k-0")  # keys keep arriving: the batch is gathering

        # Well before linger_s: the pause after the last key is what sends the batch.
        await wait_for(lambda: processed.seen("scheduler", "k-19"), 30, "the keys written after the burst")
        for n in range(20):
            assert await processed.seen("scheduler", f"k-{n}")


async def test_past_the_pending_bound_a_record_returns_only_once_its_key_is_written(
    live_settings: Settings,
) -> None:
    async with Database(live_settings.mongo, (PROCESSED_MESSAGES_INDEXES,)) as database:
        processed = ProcessedMessages(database, max_pending=0)
        for message_id in ("a", "b", "c"):
            await processed.record("exporter", message_id)
            assert await processed.seen("exporter", message_id)


async def test_a_failed_write_is_counted_and_releases_the_deliveries_waiting_on_it(
    live_settings: Settings,
) -> None:
    async with Database(live_settings.mongo, (PROCESSED_MESSAGES_INDEXES,)) as database:
        processed = ProcessedMessages(database, max_pending=0)
        before = unwritten_keys()
        await database.close()  # every write from now on fails

        await asyncio.wait_for(processed.record("exporter", "lost"), timeout=10)
        await asyncio.wait_for(processed.flush(), timeout=10)

        assert unwritten_keys() == before + 1
