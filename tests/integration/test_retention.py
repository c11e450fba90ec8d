"""``mwm cleanup`` (a subprocess) removes only what is older than ``export.retention_days``."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

from devkit.events import payload_arrived
from devkit.services import settings_env
from tests.support.cli import Cli
from tests.support.exports import create_task, placeholder_files
from tests.support.jobs import SLEEPER, job_finished, launch_job, pipeline_and_api
from wm.adapters.mongo import PROCESSED_MESSAGES, Database, ProcessedMessages
from wm.adapters.objectstore import ObjectStore
from wm.config import Settings
from wm.domain.discovery import Placement
from wm.domain.jobs import JobState
from wm.engines.local import LocalEngine, LocalEngineSettings
from wm.stores import bucket_index, buckets, exports, jobs
from wm.stores.buckets import BucketStore
from wm.stores.discovery_retention import DiscoveryRetention
from wm.stores.exports import ExportTasks
from wm.stores.jobs import JobStore

NOW = datetime.now(UTC)
OLD, RECENT = NOW - timedelta(days=8), NOW - timedelta(days=6)


async def finished_job(store: JobStore, job_id: str, finished_at: datetime) -> None:
    job = jobs.Job(
        job_id=job_id,
        bucket_id=f"bucket-{job_id}",
        correlation_id=job_id,
        application_id="seg",
        application_revision=1,
        engine="local",
        state=JobState.succeeded,
        input_prefix=f"jobs/{job_id}/input/",
        output_prefix=f"jobs/{job_id}/output/",
        deadline=NOW,
        finished_at=finished_at,
    )
    await store.create(job)


async def seed(settings: Settings, database: Database, objects: ObjectStore, scratch: Path) -> None:
    """Old and recent export tasks, jobs (files, work dirs, finish claims) and processed-message keys."""
    tasks = ExportTasks(database)
    for job_id, completed_at in (("job-old", OLD), ("job-new", RECENT)):
        task_id = await create_task(tasks, job_id, placeholder_files(settings, job_id))
        await tasks.record_result(task_id, "succeeded", [])
        await database.collection(exports.EXPORT_TASKS).update_one(
            {"_id": task_id}, {"$set": {"completed_at": completed_at}}
        )
        await finished_job(JobStore(database), job_id, completed_at)
        claim = {"_id": job_id, "claimed_at": completed_at, "published_at": completed_at}
        await database.collection(jobs.FINISHES).insert_one(claim)
        (scratch / "data.dcm").write_bytes(b"x")
        await objects.put_file(f"jobs/{job_id}/input/a.dcm", scratch / "data.dcm")
        await objects.put_file(f"jobs/{job_id}/output/b.dcm", scratch / "data.dcm")
        LocalEngine(LocalEngineSettings.of(settings)).job_dir(job_id).mkdir(parents=True)
    await create_task(tasks, "job-pending", placeholder_files(settings, "job-pending"))
    # An old claim whose end was never published: the monitor's to take over, not retention's to remove.
    await database.collection(jobs.FINISHES).insert_one(
        {"_id": "job-pending", "claimed_at": OLD, "published_at": None}
    )
    processed = ProcessedMessages(database)
    for message_id in ("m-old", "m-new"):
        await processed.record("exporter", message_id)
    await processed.flush()
    await database.collection(PROCESSED_MESSAGES).update_one(
        {"_id": "exporter:m-old"}, {"$set": {"processed_at": OLD}}
    )


async def test_cleanup_removes_only_what_is_older_than_the_retention(
    live_settings: Settings, tmp_path: Path
) -> None:
    cli = Cli(settings_env(live_settings))
    async with (
        Database(live_settings.mongo, (*exports.INDEXES, *jobs.INDEXES)) as database,
        ObjectStore(live_settings.object_store) as objects,
    ):
        await seed(live_settings, database, objects, tmp_path)
        dry = await cli("cleanup", "--dry-run")
        after_dry_run = len(await objects.list("jobs/"))
        done = await cli("cleanup")
        again = await cli("cleanup")
        remaining_tasks = {t.export_task_id for t in (await ExportTasks(database).query()).items}
        remaining_objects = [ref.key for ref in await objects.list("jobs/")]
        remaining_keys = await database.collection(PROCESSED_MESSAGES).distinct("_id")
        purged = await database.collection(jobs.JOBS).distinct("_id", {"purged_at": {"$ne": None}})
        claims = await database.collection(jobs.FINISHES).distinct("_id")
    assert dry.code == 0 and "would remove export tasks: 1" in dry.out, dry.out + dry.err
    assert after_dry_run == 4, "a dry run removes nothing"
    assert done.code == 0, done.err
    for line in ("export tasks: 1", "jobs purged: 1 (job-old)", "objects: 2", "work directories: 1"):
        assert f"removed {line}" in done.out, done.out
    assert "removed processed-message keys: 1" in done.out
    assert "removed job finish claims: 1" in done.out
    assert "removed export tasks: 0" in again.out and "removed jobs purged: 0" in again.out
    assert remaining_tasks == {"job-new.ig", "job-pending.ig"}
    assert remaining_objects == ["jobs/job-new/input/a.dcm", "jobs/job-new/output/b.dcm"]
    assert remaining_keys == ["exporter:m-new"] and purged == ["job-old"]
    assert sorted(claims) == ["job-new", "job-pending"]
    assert not LocalEngine(LocalEngineSettings.of(live_settings)).job_dir("job-old").exists()
    assert LocalEngine(LocalEngineSettings.of(live_settings)).job_dir("job-new").exists()


DISCOVERY = (
    buckets.BUCKETS,
    buckets.FILES,
    buckets.CLOSURES,
    buckets.MEMBERSHIPS,
    bucket_index.SLOTS,
    bucket_index.WATCH,
)


async def study_footprint(database: Database, objects: ObjectStore, job_id: str) -> dict[str, int]:
    """Everything kept of the study a job was made from: its discovery documents and its objects."""
    job = await JobStore(database).get(job_id)
    key = job.bucket_id.rsplit(".g", 1)[0]
    mine = {"$regex": f"^{re.escape(key)}[.:]"}
    counts = {
        name: await database.collection(name).count_documents({"$or": [{"_id": mine}, {"bucket_id": mine}]})
        for name in DISCOVERY
    }
    files = await database.collection(buckets.FILES).find({"bucket_id": mine}).to_list(None)
    payloads = {str(doc["file"]["key"]).split("/")[1] for doc in files} or {"-"}
    counts["payload objects"] = sum([len(await objects.list(f"payloads/{p}/")) for p in payloads])
    counts["job objects"] = len(await objects.list(f"jobs/{job_id}/"))
    return counts


async def test_cleanup_removes_every_trace_of_an_old_study_and_nothing_of_a_running_job(
    live_settings: Settings, tmp_path: Path
) -> None:
    settings = live_settings
    async with pipeline_and_api(settings) as events:
        done = await launch_job(settings, events, tmp_path, "mip")
        await job_finished(events, done.job_id)
        running = await launch_job(settings, events, tmp_path, "slow", command=SLEEPER)
    cli = Cli(settings_env(settings))
    async with (
        Database(settings.mongo, (*buckets.INDEXES, *jobs.INDEXES)) as database,
        ObjectStore(settings.object_store) as objects,
    ):
        (tmp_path / "leftover.dcm").write_bytes(b"half a file")
        await objects.put_file("payloads/aborted/1.2.3/4.5.6/7.8.9.dcm", tmp_path / "leftover.dcm")
        # Both studies' buckets closed, and the finished job ended, before the retention.
        await database.collection(buckets.BUCKETS).update_many({}, {"$set": {"closed_at": OLD}})
        await database.collection(jobs.JOBS).update_one({"_id": done.job_id}, {"$set": {"finished_at": OLD}})
        old_before = await study_footprint(database, objects, done.job_id)
        running_before = await study_footprint(database, objects, running.job_id)
        cleaned = await cli("cleanup")
        old_after = await study_footprint(database, objects, done.job_id)
        running_after = await study_footprint(database, objects, running.job_id)
        purged = (await database.collection(jobs.JOBS).find_one({"_id": done.job_id}) or {}).get("purged_at")
        leftover_kept = len(await objects.list("payloads/aborted/"))
        stores = DiscoveryRetention(database, objects)
        later = await stores.clean_up(datetime.now(UTC) + timedelta(seconds=1))  # the leftover has aged
        leftover_after = len(await objects.list("payloads/aborted/"))
        running_later = await study_footprint(database, objects, running.job_id)
    print(f"old study before: {old_before}\nold study after: {old_after}")
    print(f"running job's study before/after: {running_before} / {running_after}")
    assert cleaned.code == 0, cleaned.err
    assert "removed bucket keys: 1" in cleaned.out, cleaned.out
    assert all(old_before[name] > 0 for name in (buckets.BUCKETS, buckets.FILES, buckets.MEMBERSHIPS)), (
        old_before
    )
    assert old_before["payload objects"] == 2 and old_before["job objects"] >= 3, old_before
    assert set(old_after.values()) == {0}, old_after
    assert purged is not None, "the job record stays for the history, marked purged"
    assert running_after == running_before and running_before["payload objects"] == 2, running_before
    assert leftover_kept == 1, "a leftover younger than the retention stays"
    assert later.payload_objects == 1 and leftover_after == 0 and running_later == running_before


async def test_a_study_sent_again_after_its_buckets_were_removed_opens_a_new_generation(
    live_settings: Settings,
) -> None:
    where = Placement("seg", 1, "StudyInstanceUID", "1.2.3.4", 0.0)
    async with (
        Database(live_settings.mongo, buckets.INDEXES) as database,
        ObjectStore(live_settings.object_store) as objects,
    ):
        first = await BucketStore(database).add_file(where, payload_arrived(key="payloads/p1/a.dcm"))
        closing = await BucketStore(database).close(first.bucket_id, datetime.now(UTC) + timedelta(seconds=1))
        await BucketStore(database).mark_published(first.bucket_id)
        removed = await DiscoveryRetention(database, objects).clean_up(
            datetime.now(UTC) + timedelta(seconds=1)
        )
        again = await BucketStore(database).add_file(where, payload_arrived(key="payloads/p2/a.dcm"))
    assert closing.closed and first.bucket_id == where.bucket_id(1)
    assert removed.bucket_keys == 1
    assert again.bucket_id == where.bucket_id(2), "a removed generation's id (and its job id) is never reused"
