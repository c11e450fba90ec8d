"""The fleet gauges and the lease counters move with what happens, on the real database and broker."""

from __future__ import annotations

import asyncio

import aio_pika
from prometheus_client import REGISTRY

from tests.support.exports import create_task, placeholder_files
from wm.adapters.mongo import Database
from wm.adapters.rabbitmq import Bus, dead_letter_queue_name
from wm.config import Settings
from wm.fleet import FleetGauges
from wm.stores.exports import INDEXES, ExportTasks


def sample(name: str, **labels: str) -> float:
    value = REGISTRY.get_sample_value(name, labels)
    assert value is not None, f"{name}{labels} is not exported"
    return value


async def test_a_failed_export_and_an_open_one_show_in_the_fleet_gauges(live_settings: Settings) -> None:
    async with Database(live_settings.mongo, INDEXES) as database, Bus(live_settings.bus) as bus:
        tasks = ExportTasks(database)
        failed = await create_task(tasks, "job-failed", placeholder_files(live_settings, "job-failed"))
        await tasks.record_result(failed, "failed", [], "the peer refused every file")
        await create_task(tasks, "job-open", placeholder_files(live_settings, "job-open"))
        await asyncio.sleep(0.05)  # the open task has an age

        await FleetGauges(database, bus, consumers=[]).refresh()

    assert sample("mwm_export_tasks", state="failed") == 1
    assert sample("mwm_export_tasks", state="pending") == 1
    assert sample("mwm_export_tasks", state="in_progress") == 0
    assert sample("mwm_oldest_unfinished_age_seconds", kind="export") > 0
    assert sample("mwm_jobs", state="running") == 0
    assert sample("mwm_oldest_unfinished_age_seconds", kind="job") == 0


async def test_dead_letters_and_queue_depths_show_per_consumer(live_settings: Settings) -> None:
    async with Database(live_settings.mongo) as database, Bus(live_settings.bus) as bus:
        await bus.declare_consumer_queue(bus.channel, "discovery", ["mwm.payload.arrived.v1"])
        for number in range(3):
            message = aio_pika.Message(b"{}", message_id=f"m-{number}")
            await bus.send_to_queue(message, dead_letter_queue_name(live_settings.bus, "discovery"))

        await FleetGauges(database, bus, consumers=["discovery", "not-declared"]).refresh()

    assert sample("mwm_dead_letters", consumer="discovery") == 3
    assert sample("mwm_queue_messages", consumer="discovery") == 0
    assert sample("mwm_queue_consumers", consumer="discovery") == 0
    assert REGISTRY.get_sample_value("mwm_dead_letters", {"consumer": "not-declared"}) is None


async def test_a_claim_after_an_unreleased_lease_expired_counts_a_lease_expiry(
    live_settings: Settings,
) -> None:
    before = REGISTRY.get_sample_value("mwm_lease_expiries_total", {"kind": "export"}) or 0
    async with Database(live_settings.mongo, INDEXES) as database:
        tasks = ExportTasks(database)
        task_id = await create_task(tasks, "job-lease", placeholder_files(live_settings, "job-lease"))
        assert await tasks.claim_task(task_id, "client-that-dies", lease_s=0.05)
        await asyncio.sleep(0.2)
        assert await tasks.claim_task(task_id, "client-that-takes-over", lease_s=30)
        released = await create_task(tasks, "job-released", placeholder_files(live_settings, "job-released"))
        assert await tasks.claim_task(released, "client-a", lease_s=30)
        assert await tasks.release(released, "client-a")
        assert await tasks.claim_task(released, "client-b", lease_s=30)

    assert sample("mwm_lease_expiries_total", kind="export") == before + 1
