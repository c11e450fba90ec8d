"""``mwm cleanup`` (a subprocess) removes only what is older than ``export.retention_days``."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from tests.support.cli import Cli
from tests.support.exports import create_task, placeholder_files
from tests.support.services import settings_env
from wm import exports, jobs
from wm.adapters.mongo import PROCESSED_MESSAGES, Database, ProcessedMessages
from wm.adapters.objectstore import ObjectStore
from wm.config import Settings
from wm.domain.jobs import JobState
from wm.engines.local import LocalEngine
from wm.exports import ExportTasks
from wm.jobs import JobStore

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
        LocalEngine(settings).job_dir(job_id).mkdir(parents=True)
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
    assert not LocalEngine(live_settings).job_dir("job-old").exists()
    assert LocalEngine(live_settings).job_dir("job-new").exists()
