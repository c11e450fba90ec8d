"""The scheduler handler on fakes: the job a bucket makes, staging, launch, redelivery, giving up."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from consumers.scheduler import SchedulerDeps, give_up, handle
from schemas.events import BucketReady, JobFinished, JobLaunched
from tests.unit.builders import application, bucket_ready_event
from tests.unit.fakes import FakeEngine, FakeEngines, FakeJobs, FakeObjects, FakePublisher, FakeRevisions
from wm.domain.jobs import JobState, JobTransition, job_id_for
from wm.errors import NotFound, TransientError


class World:
    """The scheduler's fakes, holding the bucket's files in the object store."""

    def __init__(self, event: BucketReady) -> None:
        self.jobs, self.objects, self.engine = FakeJobs(), FakeObjects(), FakeEngine()
        self.publisher = FakePublisher()
        for member in event.files:
            self.objects.put(member.file.key)
        self.deps = SchedulerDeps(
            FakeRevisions(application()), self.jobs, self.objects, FakeEngines(self.engine), self.publisher
        )


async def test_a_closed_bucket_becomes_one_launched_job_with_exactly_its_files_staged() -> None:
    event = bucket_ready_event(application(), files=3)
    world = World(event)

    await handle(event, world.deps)

    job_id = job_id_for(event.bucket_id)
    job = world.jobs.jobs[job_id]
    assert job.state is JobState.launched and job.engine_job_id == f"engine-{job_id}"
    staged = [key for key in world.objects.objects if key.startswith(job.input_prefix)]
    assert staged == [f"jobs/{job_id}/input/1.2.3.1/1.2.3.1.{n}.dcm" for n in range(3)]
    spec = world.engine.launched[job_id]
    assert (spec.input_prefix, spec.output_prefix) == (f"jobs/{job_id}/input/", f"jobs/{job_id}/output/")
    expected_deadline = datetime.now(UTC) + timedelta(seconds=60)
    assert abs(spec.deadline - expected_deadline) < timedelta(seconds=5)
    [published] = world.publisher.published
    assert isinstance(published.event, JobLaunched) and published.message_id == f"{job_id}.launched"
    assert published.event.engine_job_id == job.engine_job_id


async def test_a_redelivered_bucket_launches_nothing_more_and_re_announces_under_the_same_id() -> None:
    event = bucket_ready_event(application())
    world = World(event)

    await handle(event, world.deps)
    await handle(event, world.deps)

    assert world.engine.launches == 1 and len(world.jobs.jobs) == 1
    ids = [p.message_id for p in world.publisher.of(JobLaunched)]
    assert ids == [f"{job_id_for(event.bucket_id)}.launched"] * 2


async def test_a_bucket_whose_job_ended_is_neither_launched_nor_announced_again() -> None:
    event = bucket_ready_event(application())
    world = World(event)
    await handle(event, world.deps)
    await world.jobs.apply(job_id_for(event.bucket_id), JobTransition.fail, message="it crashed")
    world.publisher.published.clear()

    await handle(event, world.deps)

    assert world.engine.launches == 1 and world.publisher.published == []


async def test_an_engine_outage_leaves_the_job_created_and_the_retry_launches_it_once() -> None:
    event = bucket_ready_event(application())
    world = World(event)
    world.engine.fail_next()

    with pytest.raises(TransientError):
        await handle(event, world.deps)
    assert world.jobs.jobs[job_id_for(event.bucket_id)].state is JobState.created
    assert world.publisher.published == []
    await handle(event, world.deps)

    assert world.engine.launches == 1
    assert world.jobs.jobs[job_id_for(event.bucket_id)].state is JobState.launched


async def test_an_unknown_application_revision_creates_no_job() -> None:
    event = bucket_ready_event(application("gone"))
    world = World(event)

    with pytest.raises(NotFound):
        await handle(event, world.deps)

    assert world.jobs.jobs == {} and world.engine.launches == 0


async def test_giving_up_fails_a_job_the_engine_never_got_and_says_so() -> None:
    event = bucket_ready_event(application())
    world = World(event)
    world.engine.fail_next()
    with pytest.raises(TransientError):
        await handle(event, world.deps)

    await give_up(event, world.deps, "engine down for 50 s")

    job = world.jobs.jobs[job_id_for(event.bucket_id)]
    assert job.state is JobState.failed and job.message == "engine down for 50 s"
    [finished] = world.publisher.of(JobFinished)
    assert isinstance(finished.event, JobFinished) and finished.event.status == "failed"
    assert finished.message_id == f"{job.job_id}.finished"


async def test_giving_up_leaves_a_launched_job_to_the_monitor() -> None:
    event = bucket_ready_event(application())
    world = World(event)
    await handle(event, world.deps)

    await give_up(event, world.deps, "broker down")

    assert world.jobs.jobs[job_id_for(event.bucket_id)].state is JobState.launched
    assert world.publisher.of(JobFinished) == []
