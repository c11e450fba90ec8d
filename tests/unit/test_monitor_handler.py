"""The monitor on fakes: status checks, a job's end published once, its export requests, take-overs."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest

from consumers.monitor import MonitorDeps, check, finish, follow, handle, take_over
from schemas.events import ExportRequested, JobFinished, JobLaunched
from tests.unit.builders import application, job, ref, sink
from tests.unit.fakes import (
    FakeEngine,
    FakeEngines,
    FakeExportTasks,
    FakeJobs,
    FakeObjects,
    FakePublisher,
    FakeRevisions,
    FakeSinks,
)
from wm.config import MonitorSettings
from wm.domain.engines import EngineStatus
from wm.domain.exports import ExportState
from wm.domain.jobs import Job, JobState
from wm.errors import TransientError

ENGINE_JOB = "engine-job-1"


class World:
    """The monitor's fakes, with one job of application ``seg`` (exporting to ``pacs``) being followed."""

    def __init__(self, watched: Job | None = None, sinks: tuple[str, ...] = ("pacs",)) -> None:
        self.jobs, self.engine, self.objects = FakeJobs(), FakeEngine(), FakeObjects()
        self.exports, self.publisher = FakeExportTasks(), FakePublisher()
        self.job = watched or job()
        self.jobs.jobs[self.job.job_id] = self.job
        self.jobs.due[self.job.job_id] = datetime.now(UTC)
        self.deps = MonitorDeps(
            self.jobs,
            FakeEngines(self.engine),
            self.objects,
            FakeRevisions(application(sinks=list(sinks))),
            FakeSinks(sink("pacs")),
            self.exports,
            self.publisher,
            MonitorSettings(poll_interval_s=0.01, finish_lease_s=0.05),
        )

    def stored(self) -> Job:
        return self.jobs.jobs[self.job.job_id]

    def finished(self) -> list[JobFinished]:
        return [p.event for p in self.publisher.of(JobFinished) if isinstance(p.event, JobFinished)]


async def test_job_launched_makes_the_job_due_now() -> None:
    world = World()
    world.jobs.due[world.job.job_id] = datetime.now(UTC) + timedelta(hours=1)
    event = JobLaunched(
        correlation_id="corr-1",
        job_id=world.job.job_id,
        bucket_id=world.job.bucket_id,
        application_id="seg",
        application_revision=1,
        engine="local",
        engine_job_id=ENGINE_JOB,
        input_prefix=world.job.input_prefix,
        output_prefix=world.job.output_prefix,
        deadline=world.job.deadline,
    )

    await handle(event, world.deps)

    assert world.jobs.due[world.job.job_id] <= datetime.now(UTC)


async def test_a_running_job_is_marked_running_and_checked_again_one_interval_later() -> None:
    world = World()
    world.engine.phases[ENGINE_JOB] = EngineStatus("running")

    await check(world.job, world.deps)

    assert world.stored().state is JobState.running
    assert world.jobs.due[world.job.job_id] > datetime.now(UTC)
    assert world.publisher.published == []


async def test_a_succeeded_job_is_finished_with_its_outputs_and_its_export_requested() -> None:
    world = World()
    world.objects.put("jobs/job-1/output/result.dcm")
    world.objects.put("jobs/other/output/not-mine.dcm")
    world.engine.phases[ENGINE_JOB] = EngineStatus("succeeded")

    await check(world.job, world.deps)

    job = world.stored()
    assert job.state is JobState.succeeded and [o.key for o in job.outputs] == [
        "jobs/job-1/output/result.dcm"
    ]
    assert job.job_id not in world.jobs.due
    assert [(type(p.event), p.message_id) for p in world.publisher.published] == [
        (JobFinished, "job-1.finished"),
        (ExportRequested, "job-1.pacs"),
    ]
    task = world.exports.tasks["job-1.pacs"]
    assert task.state is ExportState.pending and task.files == job.outputs
    assert world.jobs.published_finishes == {"job-1"}


async def test_a_failed_job_is_announced_failed_and_exports_nothing() -> None:
    world = World()
    world.objects.put("jobs/job-1/output/partial.dcm")
    world.engine.phases[ENGINE_JOB] = EngineStatus("error", message="pod evicted")

    await check(world.job, world.deps)

    [finished] = world.finished()
    assert finished.status == "failed" and finished.message == "pod evicted" and finished.outputs == []
    assert world.exports.tasks == {} and world.publisher.of(ExportRequested) == []


async def test_a_job_past_its_deadline_is_cancelled_and_timed_out() -> None:
    world = World(job(deadline=datetime.now(UTC) - timedelta(seconds=1)))

    await check(world.job, world.deps)

    assert world.engine.cancelled == [ENGINE_JOB]
    [finished] = world.finished()
    assert finished.status == "timed_out" and "deadline" in finished.message


async def test_a_cancel_request_cancels_the_engine_job() -> None:
    world = World(job(state=JobState.running, cancel_requested=True))

    await check(world.job, world.deps)

    assert world.engine.cancelled == [ENGINE_JOB]
    assert world.stored().state is JobState.cancelled
    assert [f.status for f in world.finished()] == ["cancelled"]


async def test_a_job_end_another_replica_claimed_is_not_published_twice() -> None:
    world = World()
    world.engine.phases[ENGINE_JOB] = EngineStatus("succeeded")
    world.objects.put("jobs/job-1/output/result.dcm")

    await check(world.job, world.deps)
    await finish(world.job, "succeeded", "", world.deps)  # a second replica's check of the same end

    assert len(world.finished()) == 1 and len(world.publisher.of(ExportRequested)) == 1


async def test_a_broker_outage_after_the_end_is_recorded_leaves_the_finish_unpublished() -> None:
    world = World()
    world.engine.phases[ENGINE_JOB] = EngineStatus("succeeded")
    world.objects.put("jobs/job-1/output/result.dcm")
    world.publisher.fail_next()

    with pytest.raises(TransientError):
        await check(world.job, world.deps)

    assert world.stored().state is JobState.succeeded
    assert "job-1" in world.jobs.finishes and world.jobs.published_finishes == set()


async def test_taking_over_a_recorded_end_republishes_it_under_the_same_ids_once_more() -> None:
    world = World(job(state=JobState.succeeded, outputs=[ref("jobs/job-1/output/result.dcm")]))
    await world.jobs.claim_finish("job-1")  # the claimer died after recording the end

    await take_over(world.stored(), world.deps)
    await take_over(world.stored(), world.deps)  # a second take-over (the first one's mark was lost)

    ids = [p.message_id for p in world.publisher.published]
    assert ids == ["job-1.finished", "job-1.pacs"] * 2
    assert list(world.exports.tasks) == ["job-1.pacs"]
    assert world.jobs.published_finishes == {"job-1"}


async def test_taking_over_an_unrecorded_end_gives_the_claim_back_for_the_next_check() -> None:
    world = World()
    await world.jobs.claim_finish("job-1")  # the claimer died before recording the end

    await take_over(world.stored(), world.deps)
    assert world.publisher.published == [] and world.jobs.finishes == {}
    world.engine.phases[ENGINE_JOB] = EngineStatus("failed", message="exit 1")
    await check(world.stored(), world.deps)

    assert [f.status for f in world.finished()] == ["failed"]


async def run_follower(world: World, until: Callable[[], bool]) -> None:
    """Run the background follower until ``until()`` holds (10 s at most), then stop it."""
    stop = asyncio.Event()
    follower = asyncio.create_task(follow(world.deps, stop))
    try:
        async with asyncio.timeout(10):
            while not until():
                world.publisher.changed.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(world.publisher.changed.wait(), 0.05)
    finally:
        stop.set()
        await follower


async def test_the_follower_finishes_due_jobs_and_rides_out_an_engine_outage() -> None:
    world = World()
    world.engine.phases[ENGINE_JOB] = EngineStatus("succeeded")
    world.engine.fail_next()  # the first status check meets an outage: the job stays due

    await run_follower(world, lambda: bool(world.finished()))

    assert [f.status for f in world.finished()] == ["succeeded"]
    assert world.jobs.due == {}


async def test_the_follower_watches_unwatched_jobs_and_takes_over_stale_finishes() -> None:
    world = World(job(state=JobState.succeeded))
    world.jobs.due.clear()
    stray = job(job_id="job-2", engine_job_id="engine-job-2")  # unfinished, but not on the watch list
    world.jobs.jobs["job-2"] = stray
    world.engine.phases["engine-job-2"] = EngineStatus("succeeded")
    world.jobs.finishes["job-1"] = datetime.now(UTC) - timedelta(seconds=1)  # a claimer that died

    await run_follower(world, lambda: len(world.finished()) == 2)

    assert sorted(f.job_id for f in world.finished()) == ["job-1", "job-2"]
    assert world.jobs.published_finishes == {"job-1", "job-2"}
