"""Orchestration on the real services: a closed bucket runs the example application on the local engine."""

from __future__ import annotations

import signal
from datetime import UTC, datetime, timedelta
from pathlib import Path

from consumers import discovery, monitor, scheduler
from devkit.dicom import write_ct_study
from devkit.pipeline import arrive, consumers_running, mip_application, register, tap
from devkit.services import consumer_processes, queue_settled
from schemas.events import BucketReady, ExportRequested, JobFinished, JobLaunched
from wm.adapters.mongo import Database
from wm.adapters.objectstore import ObjectStore
from wm.adapters.rabbitmq import Bus, queue_name
from wm.config import Settings
from wm.domain.jobs import JobState, JobTransition
from wm.registry import Registry
from wm.stores import jobs
from wm.stores.jobs import JOBS, Job, JobStore


async def add_sink(settings: Settings) -> None:
    async with Database(settings.mongo) as database:
        await Registry(database).sinks.create(
            _sink(name="pacs", ae_title="PACS", host="127.0.0.1", port=11199)
        )


def _sink(name: str, ae_title: str, host: str, port: int):  # type: ignore[no-untyped-def]
    from schemas.applications import SinkDefinition

    return SinkDefinition.model_validate(
        {"name": name, "type": "dicom", "args": {"ae_title": ae_title, "host": host, "port": port}}
    )


async def test_a_closed_bucket_runs_the_example_application_and_requests_its_export(
    live_settings: Settings, tmp_path: Path
) -> None:
    settings = live_settings
    await add_sink(settings)
    await register(settings, mip_application(quiet_period_s=0.5, sinks=["pacs"]))
    study = write_ct_study(tmp_path / "s", series=2, slices_per_series=4, seed=7)
    keys = (BucketReady.event_type, JobLaunched.event_type, JobFinished.event_type, "mwm.export.requested.#")
    async with Bus(settings.bus) as bus:
        await bus.declare_consumer_queue(bus.channel, "exporter", ("mwm.export.requested.dicom",))
    async with (
        tap(settings, *keys) as events,
        consumers_running(settings, [discovery.CONSUMER, scheduler.CONSUMER, monitor.CONSUMER]),
    ):
        await arrive(settings, study.files, called_ae="MWM-MIP")
        [finished] = await events.wait_for(JobFinished, 1, 60)
        [requested] = await events.wait_for(ExportRequested, 1, 10)
    [launched] = events.of(JobLaunched)
    assert finished.status == "succeeded", finished.message
    assert finished.job_id == launched.job_id == requested.job_id
    assert len(finished.outputs) == 2, "one MIP per series"
    assert requested.sink.name == "pacs" and requested.routing_key() == "mwm.export.requested.dicom"
    async with ObjectStore(settings.object_store) as objects:
        staged = await objects.list(launched.input_prefix)
        outputs = await objects.list(launched.output_prefix)
    assert len(staged) == len(study.files), "the job sees exactly its bucket's files"
    assert [ref.key for ref in outputs] == [ref.key for ref in finished.outputs]


async def test_a_failing_application_ends_in_a_failed_job_and_no_export(
    live_settings: Settings, tmp_path: Path
) -> None:
    settings = live_settings
    await register(settings, mip_application(quiet_period_s=0.5, command=["false"]))
    study = write_ct_study(tmp_path / "s", series=1, slices_per_series=2, seed=8)
    async with (
        tap(settings, JobFinished.event_type, "mwm.export.requested.#") as events,
        consumers_running(settings, [discovery.CONSUMER, scheduler.CONSUMER, monitor.CONSUMER]),
    ):
        await arrive(settings, study.files, called_ae="MWM-MIP")
        [finished] = await events.wait_for(JobFinished, 1, 60)
    assert finished.status == "failed" and "exited with 1" in finished.message
    assert events.of(ExportRequested) == []


async def test_two_schedulers_and_a_duplicate_bucket_ready_make_one_job(
    live_settings: Settings, tmp_path: Path
) -> None:
    settings = live_settings
    await register(settings, mip_application(quiet_period_s=0.5))
    study = write_ct_study(tmp_path / "s", series=1, slices_per_series=2, seed=9)
    async with tap(settings, BucketReady.event_type, JobFinished.event_type) as events:
        async with consumers_running(settings, [discovery.CONSUMER]):
            await arrive(settings, study.files, called_ae="MWM-MIP")
            [ready] = await events.wait_for(BucketReady, 1, 30)
        async with consumers_running(settings, [monitor.CONSUMER, scheduler.CONSUMER]):
            with consumer_processes(settings, "scheduler", count=1):
                async with Bus(settings.bus) as bus:
                    for _ in range(3):
                        await bus.publish(ready, message_id=f"replayed-{_}")
                await events.wait_for(JobFinished, 1, 60)
                await queue_settled(queue_name(settings.bus, scheduler.NAME))  # every bucket.ready handled
    async with Database(settings.mongo) as database:
        assert await database.collection(JOBS).count_documents({}) == 1
    assert len({event.job_id for event in events.of(JobFinished)}) == 1
    runs = list((Path(settings.work_dir) / "jobs").iterdir())
    assert len(runs) == 1 and len((runs[0] / "app.log").read_text().splitlines()) == 1, "the MAP ran once"


async def test_a_job_is_followed_to_its_end_after_its_monitor_is_killed(
    live_settings: Settings, tmp_path: Path
) -> None:
    settings = live_settings
    slow = [
        "bash",
        "-c",
        f"sleep 3 && exec {__import__('sys').executable} {mip_application()['map']['command'][1]}",
    ]
    await register(settings, mip_application(quiet_period_s=0.5, command=slow))
    study = write_ct_study(tmp_path / "s", series=1, slices_per_series=2, seed=10)
    async with Bus(settings.bus) as bus:
        await bus.declare_consumer_queue(bus.channel, "monitor", monitor.CONSUMER.routing_keys)
    async with (
        tap(settings, JobLaunched.event_type, JobFinished.event_type) as events,
        consumers_running(settings, [discovery.CONSUMER, scheduler.CONSUMER]),
    ):
        with consumer_processes(settings, "monitor", count=1) as [first_monitor]:
            await arrive(settings, study.files, called_ae="MWM-MIP")
            await events.wait_for(JobLaunched, 1, 30)
            await queue_settled(queue_name(settings.bus, monitor.NAME))  # it follows the job now
            first_monitor.send_signal(signal.SIGKILL)
            first_monitor.wait(timeout=10)
        with consumer_processes(settings, "monitor", count=1):
            [finished] = await events.wait_for(JobFinished, 1, 60)
    assert finished.status == "succeeded", finished.message


def a_job(job_id: str) -> Job:
    return Job(
        job_id=job_id,
        bucket_id=f"b-{job_id}",
        correlation_id=f"c-{job_id}",
        application_id="mip",
        application_revision=1,
        engine="local",
        input_prefix=f"jobs/{job_id}/input/",
        output_prefix=f"jobs/{job_id}/output/",
        deadline=datetime.now(UTC) + timedelta(minutes=5),
    )


async def test_a_transition_from_a_stale_read_of_the_job_is_decided_again_from_its_real_state(
    live_settings: Settings,
) -> None:
    async with Database(live_settings.mongo, jobs.INDEXES) as database:
        store = JobStore(database)
        created = await store.create(a_job("j1"))
        launched = await store.apply("j1", JobTransition.launch, current=created, engine_job_id="j1")
        await store.apply("j1", JobTransition.start, current=launched)
        finished = await store.apply("j1", JobTransition.succeed, current=launched, message="done")
        assert finished.state is JobState.succeeded, "the read said launched; the job was running"
        assert (await store.get("j1")).state is JobState.succeeded


async def test_only_jobs_an_engine_is_running_are_due_and_an_ended_job_leaves_the_watch_list(
    live_settings: Settings,
) -> None:
    async with Database(live_settings.mongo, jobs.INDEXES) as database:
        store = JobStore(database)
        checks = database.collection(jobs.CHECKS)
        created = await store.create(a_job("j1"))
        assert await store.due_for_check(datetime.now(UTC)) == [], "a job being launched is not checked"
        entry = await checks.find_one({"_id": "j1"})
        assert entry is not None and entry["due_at"] > datetime.now(UTC), "looked at again later"

        launched = await store.apply("j1", JobTransition.launch, current=created, engine_job_id="e1")
        await store.check_again_at("j1", datetime.now(UTC))  # what job.launched does in the monitor
        assert [job.job_id for job in await store.due_for_check(datetime.now(UTC))] == ["j1"]
        await store.check_again_at("j1", datetime.now(UTC) + timedelta(minutes=1))
        assert await store.due_for_check(datetime.now(UTC)) == [], "checked once per schedule"

        await store.apply("j1", JobTransition.succeed, current=launched)
        assert await checks.count_documents({}) == 0, "the watch list holds only jobs that have not ended"


async def test_a_watch_entry_lost_or_left_behind_by_a_crash_is_repaired(live_settings: Settings) -> None:
    async with Database(live_settings.mongo, jobs.INDEXES) as database:
        store = JobStore(database)
        checks = database.collection(jobs.CHECKS)
        # The scheduler died between inserting the job and watching it: a redelivered bucket.ready watches it.
        created = await store.create(a_job("lost"))
        await checks.delete_one({"_id": "lost"})
        assert (await store.create(a_job("lost"))).state is JobState.created
        assert await checks.find_one({"_id": "lost"}) is not None

        # A monitor died between recording a job's end and unwatching it: the next look drops the entry.
        launched = await store.apply("lost", JobTransition.launch, current=created, engine_job_id="e1")
        await store.apply("lost", JobTransition.fail, current=launched)
        await checks.insert_one({"_id": "lost", "due_at": datetime.now(UTC)})
        assert await store.due_for_check(datetime.now(UTC)) == []
        assert await checks.count_documents({}) == 0


async def test_the_monitor_start_watches_unfinished_jobs_recorded_without_an_entry(
    live_settings: Settings,
) -> None:
    async with Database(live_settings.mongo, jobs.INDEXES) as database:
        store = JobStore(database)
        for job_id, state in (("running", JobState.running), ("ended", JobState.succeeded)):
            await store.create(a_job(job_id).model_copy(update={"state": state, "engine_job_id": job_id}))
        # As a write that failed half-way, or a release before the watch list, leaves them.
        await database.collection(jobs.CHECKS).delete_many({})
        assert await store.due_for_check(datetime.now(UTC)) == []

        assert await store.watch_unfinished() == 1
        assert [job.job_id for job in await store.due_for_check(datetime.now(UTC))] == ["running"]
        assert await store.watch_unfinished() == 0, "a watched job is left as it is"
