"""Scheduler: turn a closed bucket into a job and launch it on the application's engine.

Queue ``mwm.scheduler``, bound to ``mwm.bucket.ready``.

- In: ``BucketReady``.
- Decisions: the job id is derived from the bucket id (``job_id_for``); the application revision named
  by the event decides the engine, the MAP and the deadline.
- Effects: the job document (created once, under its unique id); the bucket's files copied server-side
  to ``jobs/<job id>/input/<series uid>/<sop uid>.dcm``, so the job sees exactly its bucket under one
  input prefix; the engine launch (idempotent per job id); ``JobLaunched`` (message id
  ``<job id>.launched``).
- Idempotency: a duplicate ``bucket.ready`` finds the job; a launched job is only re-announced.
- Failure: an engine or store outage is retried with backoff; when retries run out the job is marked
  failed and ``JobFinished(failed)`` is published, so nothing waits forever.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import structlog

from schemas.events import BucketReady
from wm.domain.engines import JobSpec
from wm.domain.jobs import (
    Job,
    JobState,
    JobTransition,
    finished_event,
    finished_message_id,
    job_id_for,
    launched_event,
    launched_message_id,
)
from wm.engines import LoadedEngines
from wm.errors import Conflict
from wm.ports import ApplicationRevisions, EngineDirectory, EventPublisher, JobRecords, ObjectStorage
from wm.registry import INDEXES as REGISTRY_INDEXES
from wm.runtime import Consumer, Services
from wm.stores import jobs
from wm.stores.catalog import CachedRevisions
from wm.stores.jobs import JobStore

log = structlog.get_logger("consumers.scheduler")

NAME = "scheduler"


@dataclass(frozen=True)
class SchedulerDeps:
    """The ports the scheduler uses."""

    applications: ApplicationRevisions
    jobs: JobRecords
    objects: ObjectStorage
    engines: EngineDirectory
    publisher: EventPublisher


def input_prefix(job_id: str) -> str:
    """Where a job's inputs are staged."""
    return f"jobs/{job_id}/input/"


def output_prefix(job_id: str) -> str:
    """Where a job's outputs go."""
    return f"jobs/{job_id}/output/"


async def handle(event: BucketReady, deps: SchedulerDeps) -> None:
    """Create the bucket's job, stage its inputs, launch it and announce it."""
    application = (
        await deps.applications.revision(event.application_id, event.application_revision)
    ).definition
    job_id = job_id_for(event.bucket_id)
    new_job = Job(
        job_id=job_id,
        bucket_id=event.bucket_id,
        correlation_id=event.correlation_id,
        application_id=event.application_id,
        application_revision=event.application_revision,
        engine=application.engine.name,
        input_prefix=input_prefix(job_id),
        output_prefix=output_prefix(job_id),
        deadline=datetime.now(UTC) + timedelta(seconds=application.map.timeout_s),
        possibly_incomplete=event.possibly_incomplete,
    )
    # Staging runs beside the job insert: the copies are idempotent (same files, same keys), and a job that
    # exists already (a duplicate bucket.ready) had exactly these files staged.
    staging = asyncio.ensure_future(stage(event, new_job.input_prefix, deps.objects))
    try:
        job = await deps.jobs.create(new_job)
    finally:
        await staging
    if job.state is JobState.created:
        engine_job_id = await deps.engines.engine(job.engine).launch(
            JobSpec(
                job.job_id, job.correlation_id, application, job.input_prefix, job.output_prefix, job.deadline
            )
        )
        job = await deps.jobs.apply(job_id, JobTransition.launch, current=job, engine_job_id=engine_job_id)
        log.info(
            "job_launched",
            job_id=job_id,
            engine=job.engine,
            engine_job_id=engine_job_id,
            files=len(event.files),
        )
    if job.state is JobState.launched:
        await deps.publisher.publish(launched_event(job), message_id=launched_message_id(job_id, job.attempt))


async def stage(event: BucketReady, prefix: str, objects: ObjectStorage) -> None:
    """Copy the bucket's files server-side under the job's input prefix (from whichever bucket holds
    them), all in flight at once."""
    await asyncio.gather(
        *(
            objects.copy(
                member.file.key,
                f"{prefix}{member.dicom.series_instance_uid}/{member.dicom.sop_instance_uid}.dcm",
                source_bucket=member.file.bucket,  # an IG's files stay in its bucket until staged
            )
            for member in event.files
        )
    )


async def give_up(event: BucketReady, deps: SchedulerDeps, reason: str) -> None:
    """Retries ran out: fail the job and say so, so nothing downstream waits for it.

    Only a job the engine never got: a launched one (its ``job.launched`` unpublished, the broker down)
    runs, and the monitor follows it from the database to its ``job.finished``.
    """
    job_id = job_id_for(event.bucket_id)
    if (await deps.jobs.get(job_id)).state is not JobState.created:
        return  # launched, or already finished: the monitor owns it
    try:
        job = await deps.jobs.apply(job_id, JobTransition.fail, message=reason)
    except Conflict:
        return  # finished meanwhile
    await deps.publisher.publish(finished_event(job), message_id=finished_message_id(job_id, job.attempt))


def build(services: Services) -> SchedulerDeps:
    """Wire the ports to the process's shared connections."""
    return SchedulerDeps(
        CachedRevisions(services.database),
        JobStore(services.database),
        services.objects,
        LoadedEngines(services.settings),
        services.bus,
    )


CONSUMER = Consumer[SchedulerDeps](
    name=NAME,
    handlers={BucketReady: handle},
    build_deps=build,
    indexes=(*jobs.INDEXES, *REGISTRY_INDEXES),
    on_give_up=give_up,
)
