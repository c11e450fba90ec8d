"""The watch lists the recovery sweeps read by ``_id`` (issue #18): open export tasks, unpublished finishes.

Their cost against a large history is measured by ``bench/recovery_history.py``; here, that they hold
what the sweeps need: every open task (and only those, in the end), every unpublished finish claim, and
that an entry lost to a crash, or left behind by one, is repaired.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta

from consumers import exporter
from devkit.services import wait_for
from schemas.events import utc_now
from tests.integration.test_exporter import pull_task
from tests.unit.fakes import FakePublisher
from wm.adapters.mongo import Database
from wm.config import Settings
from wm.domain.exports import ExportState, task_for
from wm.stores import jobs
from wm.stores.export_index import EXPORT_WATCH, ExportWatch
from wm.stores.export_leases import ExportLeases
from wm.stores.export_retry import ExportRetries
from wm.stores.exports import EXPORT_TASKS, ExportTasks
from wm.stores.jobs import FINISH_WATCH, FINISHES, JobStore


async def watched(database: Database) -> set[str]:
    return {task_id for task_id, _ in await ExportWatch(database).open()}


async def test_open_export_tasks_are_watched_until_final_and_again_once_reopened(
    live_settings: Settings,
) -> None:
    async with Database(live_settings.mongo, exporter.CONSUMER.indexes) as database:
        tasks = ExportTasks(database)
        for number in range(3):
            assert await tasks.create(task_for(pull_task(number), utc_now()))
        assert await watched(database) == {"job-0.ig", "job-1.ig", "job-2.ig"}

        held = await tasks.claim("ig", "dies", lease_s=0.3)  # the oldest first
        assert held is not None and held.export_task_id == "job-0.ig"

        async def expired() -> bool:
            return [task.export_task_id for task in await tasks.expire()] == ["job-0.ig"]

        await wait_for(expired, 10, "the lease to expire")
        await tasks.record_result("job-1.ig", "failed", [], "boom")
        assert await watched(database) == {"job-0.ig", "job-2.ig"}, "a final task leaves the list"

        # Made final by a writer that died before unwatching it: the next reader drops the entry.
        await database.collection(EXPORT_TASKS).update_one(
            {"_id": "job-2.ig"}, {"$set": {"state": ExportState.succeeded.value}}
        )
        assert await tasks.expire() == []
        assert await watched(database) == {"job-0.ig"}

        reopened = await ExportRetries(database).reopen("job-1.ig", FakePublisher())
        assert reopened.state is ExportState.pending and reopened.reruns == 1
        assert await watched(database) == {"job-0.ig", "job-1.ig"}
        claimed = [await tasks.claim("ig", "client", lease_s=60) for _ in range(3)]
        assert [task and task.export_task_id for task in claimed] == ["job-0.ig", "job-1.ig", None]


async def test_an_entry_of_a_reopened_run_outlives_the_removal_of_the_run_before(
    live_settings: Settings,
) -> None:
    async with Database(live_settings.mongo, exporter.CONSUMER.indexes) as database:
        tasks, watch = ExportTasks(database), ExportWatch(database)
        assert await tasks.create(task_for(pull_task(0), utc_now()))
        task = await tasks.get("job-0.ig")
        await watch.watch(task.export_task_id, "ig", task.created_at, reruns=1)  # an operator's retry
        await watch.unwatch(task.export_task_id, reruns=0)  # late: the end of run 0
        assert await watched(database) == {"job-0.ig"}


async def test_an_open_task_left_off_the_watch_list_is_watched_again(live_settings: Settings) -> None:
    async with Database(live_settings.mongo, exporter.CONSUMER.indexes) as database:
        tasks = ExportTasks(database)
        assert await tasks.create(task_for(pull_task(0), utc_now()))
        assert await tasks.create(task_for(pull_task(1), utc_now()))
        await database.collection(EXPORT_WATCH).delete_many({})  # died between the insert and the watch
        assert not await tasks.create(task_for(pull_task(0), utc_now())), "a redelivered request repairs it"
        assert await watched(database) == {"job-0.ig"}
        assert await tasks.watch_open() == 1, "the exporter's start repairs the rest"
        assert await watched(database) == {"job-0.ig", "job-1.ig"}


async def test_unpublished_finish_claims_are_watched_until_published(live_settings: Settings) -> None:
    lease = timedelta(seconds=0.5)
    async with Database(live_settings.mongo, jobs.INDEXES) as database:
        store = JobStore(database)
        watch = database.collection(FINISH_WATCH)
        assert await store.claim_finish("dies")
        assert await store.claim_finish("publishes")
        assert not await store.claim_finish("dies"), "one claimer per job"
        assert await store.stale_finishes(lease) == [], "fresh claims are not stale"
        await store.mark_finish_published("publishes")
        await asyncio.sleep(lease.total_seconds())
        assert await store.stale_finishes(lease) == ["dies"]
        assert await store.reclaim_finish("dies", lease)
        assert await store.stale_finishes(lease) == [], "taken over: fresh again"
        await store.release_finish("dies")
        assert await watch.count_documents({}) == 0, "the list holds only unpublished claims"


async def test_a_finish_watch_entry_lost_or_left_behind_is_repaired(live_settings: Settings) -> None:
    lease = timedelta(seconds=0.5)
    async with Database(live_settings.mongo, jobs.INDEXES) as database:
        store = JobStore(database)
        watch = database.collection(FINISH_WATCH)
        # A claim recorded before the watch list existed: the monitor's start watches it.
        await database.collection(FINISHES).insert_one(
            {"_id": "old", "claimed_at": utc_now() - 2 * lease, "published_at": None}
        )
        assert await store.watch_unfinished() == 1
        assert await store.stale_finishes(lease) == ["old"]
        # A claimer that died between watching and claiming: its entry goes once older than the lease.
        await watch.insert_one({"_id": "never-claimed", "watched_at": utc_now()})
        assert await store.stale_finishes(lease) == ["old"]
        assert await watch.find_one({"_id": "never-claimed"}) is not None, (
            "a claimer may be between its writes"
        )
        await asyncio.sleep(lease.total_seconds())
        assert await store.stale_finishes(lease) == ["old"]
        assert await watch.find_one({"_id": "never-claimed"}) is None


async def test_a_claim_that_failed_before_its_task_showed_the_lease_is_requested_again_once(
    live_settings: Settings,
) -> None:
    async with Database(live_settings.mongo, exporter.CONSUMER.indexes) as database:
        tasks = ExportTasks(database)
        assert await tasks.create(task_for(pull_task(0), utc_now()))
        now = utc_now()
        # The claimer took lease 0, then lost the database before the task showed it, and retried under
        # another owner, which found the lease live and let the request go as a duplicate.
        taken = await ExportLeases(database).take(
            "job-0.ig", 0, "lost", now - timedelta(seconds=5), now - timedelta(seconds=1)
        )
        assert taken == 0
        assert (await tasks.get("job-0.ig")).state is ExportState.pending

        assert [task.export_task_id for task in await tasks.expire()] == ["job-0.ig"]
        assert await tasks.expire() == [], "requested again once, not at every sweep"
        held = await tasks.claim_task("job-0.ig", "next", lease_s=5)
        assert held is not None and held.lease_owner == "next"
        assert await tasks.expire() == [], "a live lease is left alone"
