"""Monitor: follow launched jobs to their end, then announce the end and request the exports.

Queue ``mwm.monitor``, bound to ``mwm.job.launched``.

- In: ``JobLaunched``: the job is due for a status check now. The delivery is acknowledged at once; no
  delivery is held while a job runs.
- Background (every replica): jobs in ``launched``/``running`` whose next check is due are asked for
  their engine status every ``monitor.poll_interval_s``. A job past its deadline is cancelled and ends
  ``timed_out``; a job whose cancel was requested is cancelled.
- Effects at the end: the job's state and outputs (listed from its output prefix; a success without
  any says so in the job's message and a warning); ``JobFinished`` (message id
  ``<job id>.finished``, ``.a<n>`` added for a retried job's attempt n); on success one export task per sink
  of the application and ``ExportRequested`` on ``mwm.export.requested.<sink type>`` (message id = export task
  id).
- Idempotency: one replica wins the finish (unique insert) and renews its claim while it works; a finish whose
  claimer died or failed (stopped renewing) is taken over after ``monitor.finish_lease_s`` (looked for four
  times per lease) and re-published under the same message ids, or, when the claimer died (or S3 or the
  database failed) before the job's end was recorded, released for the next check.
- Failure: engine or store outages leave the job due; the next check retries.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import structlog

from schemas.events import ExportRequested, JobLaunched, JobOutcome, SinkRef
from wm import metrics
from wm.config import MonitorSettings
from wm.domain.exports import task_for
from wm.domain.jobs import (
    Job,
    JobState,
    JobTransition,
    export_task_id_for,
    finished_event,
    finished_message_id,
)
from wm.engines import LoadedEngines
from wm.errors import TransientError
from wm.leases import renewed
from wm.ports import (
    ApplicationRevisions,
    EngineDirectory,
    EventPublisher,
    ExportTaskRecords,
    JobRecords,
    ObjectStorage,
    SinkDirectory,
)
from wm.registry import Registry
from wm.runtime import Consumer, Services
from wm.service_layer.periodic import every
from wm.stores import jobs
from wm.stores.exports import INDEXES as EXPORT_INDEXES
from wm.stores.exports import ExportTasks
from wm.stores.jobs import JobStore

log = structlog.get_logger("consumers.monitor")

NAME = "monitor"
CONCURRENT_CHECKS = 16
T = TypeVar("T")

_OUTCOME_TRANSITION: dict[str, JobTransition] = {
    "succeeded": JobTransition.succeed,
    "failed": JobTransition.fail,
    "cancelled": JobTransition.cancel,
    "timed_out": JobTransition.time_out,
}


@dataclass(frozen=True)
class MonitorDeps:
    """The ports the monitor uses."""

    jobs: JobRecords
    engines: EngineDirectory
    objects: ObjectStorage
    applications: ApplicationRevisions
    sinks: SinkDirectory
    exports: ExportTaskRecords
    publisher: EventPublisher
    settings: MonitorSettings


async def handle(event: JobLaunched, deps: MonitorDeps) -> None:
    """Make the job due for a status check now (the background follower does the rest)."""
    await deps.jobs.check_again_at(event.job_id, datetime.now(UTC))


async def follow(deps: MonitorDeps, stop: asyncio.Event) -> None:
    """Check due jobs until ``stop`` is set."""
    lease = timedelta(seconds=deps.settings.finish_lease_s)
    checks = asyncio.Semaphore(CONCURRENT_CHECKS)

    async def guarded(job: Job) -> None:
        async with checks:
            await _guarded(check(job, deps))

    loop = asyncio.get_running_loop()
    next_sweep = loop.time()
    repaired: int | None = None

    async def poll() -> None:
        nonlocal next_sweep, repaired
        if repaired is None:  # once per start, retried while the database is out
            repaired = await _guarded(deps.jobs.watch_unfinished())
            if repaired:
                log.warning("unwatched_jobs_watched", jobs=repaired)
        due = await _guarded(deps.jobs.due_for_check(datetime.now(UTC))) or []
        # Concurrently: one slow engine or store call must not delay every other job's end.
        await asyncio.gather(*(guarded(job) for job in due))
        if loop.time() >= next_sweep:
            # A few looks per lease, not every poll: a take-over still starts within 1.25 leases. Each look
            # reads the watch list of unpublished claims (``wm.stores.jobs``), not every claim kept.
            next_sweep = loop.time() + deps.settings.finish_lease_s / 4
            for job_id in await _guarded(deps.jobs.stale_finishes(lease)) or []:
                if await _guarded(deps.jobs.reclaim_finish(job_id, lease)):
                    metrics.FINISH_TAKEOVERS.inc()
                    await _guarded(_take_over_by_id(job_id, deps))

    await every(deps.settings.poll_interval_s, stop, poll, "job_check")


async def _guarded(work: Coroutine[Any, Any, T]) -> T | None:
    """Run one step of the follower; an outage defers it, a bug is logged loudly; neither stops the loop."""
    try:
        return await work
    except TransientError as exc:
        log.warning("job_check_deferred", error=str(exc))
    except Exception as exc:
        log.exception("job_check_failed", error=repr(exc))
    return None


async def _take_over_by_id(job_id: str, deps: MonitorDeps) -> None:
    await take_over(await deps.jobs.get(job_id), deps)


async def take_over(job: Job, deps: MonitorDeps) -> None:
    """Finish the work of a finish claimer that died or failed (S3 or the database down) on the way."""
    if job.terminal:
        log.warning("job_finish_taken_over", job_id=job.job_id)
        async with _renewing_finish(job, deps):
            await complete(job, deps)
    else:  # its end was never recorded: give the claim back; the job's next check finishes it
        log.warning("job_finish_released", job_id=job.job_id, state=job.state.value)
        await deps.jobs.release_finish(job.job_id)


async def check(job: Job, deps: MonitorDeps) -> None:
    """One status check of one job."""
    assert job.engine_job_id is not None
    engine = deps.engines.engine(job.engine)
    now = datetime.now(UTC)
    if job.cancel_requested or now > job.deadline:
        await engine.cancel(job.engine_job_id)
        cancelled = job.cancel_requested
        await finish(
            job,
            "cancelled" if cancelled else "timed_out",
            "cancelled on request" if cancelled else f"deadline {job.deadline.isoformat()} passed",
            deps,
        )
        return
    status = await engine.status(job.engine_job_id)
    if status.terminal:
        await finish(job, "succeeded" if status.phase == "succeeded" else "failed", status.message, deps)
        return
    if status.phase == "running" and job.state is JobState.launched:
        await deps.jobs.apply(job.job_id, JobTransition.start, current=job)
    await deps.jobs.check_again_at(job.job_id, now + timedelta(seconds=deps.settings.poll_interval_s))


async def finish(job: Job, outcome: JobOutcome, message: str, deps: MonitorDeps) -> None:
    """Record the job's end once across replicas, then publish it."""
    if not await deps.jobs.claim_finish(job.job_id):
        return
    async with _renewing_finish(job, deps):
        await _record_end(job, outcome, message, deps)


def _renewing_finish(job: Job, deps: MonitorDeps) -> contextlib.AbstractAsyncContextManager[None]:
    """The job's finish claim kept fresh while its claimer works on it (``wm.leases``)."""
    renew = functools.partial(deps.jobs.renew_finish, job.job_id)
    return renewed(renew, deps.settings.finish_lease_s, f"finish of job {job.job_id}")


async def _record_end(job: Job, outcome: JobOutcome, message: str, deps: MonitorDeps) -> None:
    outputs = await deps.objects.list(job.output_prefix) if outcome == "succeeded" else []
    if outcome == "succeeded" and not outputs:
        # Not an error (an application may only check its input), but no export follows: say so.
        message = "; ".join(
            filter(None, [message, f"no outputs under {job.output_prefix}: nothing to export"])
        )
        log.warning("job_succeeded_without_outputs", job_id=job.job_id, output_prefix=job.output_prefix)
    transition = _OUTCOME_TRANSITION[outcome]
    job = await deps.jobs.apply(job.job_id, transition, current=job, message=message, outputs=outputs)
    log.info(
        "job_finished", job_id=job.job_id, outcome=outcome, outputs=len(outputs), message=message or None
    )
    await complete(job, deps)


async def complete(job: Job, deps: MonitorDeps) -> None:
    """Publish the job's end and its export requests (safe to repeat: ids are derived)."""
    await deps.publisher.publish(finished_event(job), message_id=finished_message_id(job.job_id, job.attempt))
    if job.state is JobState.succeeded and job.outputs:
        application = await deps.applications.revision(job.application_id, job.application_revision)
        for sink_name in application.definition.sinks:
            await request_export(job, sink_name, deps)
    await deps.jobs.mark_finish_published(job.job_id)


async def request_export(job: Job, sink_name: str, deps: MonitorDeps) -> None:
    """Create the export task of the job's outputs for one sink and publish its request."""
    sink = await deps.sinks.get(sink_name)
    task_id = export_task_id_for(job.job_id, sink_name)
    request = ExportRequested(
        correlation_id=job.correlation_id,
        export_task_id=task_id,
        job_id=job.job_id,
        application_id=job.application_id,
        sink=SinkRef(name=sink.name, type=sink.type),
        files=job.outputs,
    )
    await deps.exports.create(task_for(request, datetime.now(UTC)))
    await deps.publisher.publish(request, message_id=task_id)


def build(services: Services) -> MonitorDeps:
    """Wire the ports to the process's shared connections."""
    registry = Registry(services.database)
    return MonitorDeps(
        JobStore(services.database),
        LoadedEngines(services.settings),
        services.objects,
        registry,
        registry.sinks,
        ExportTasks(services.database),
        services.bus,
        services.settings.monitor,
    )


CONSUMER = Consumer[MonitorDeps](
    name=NAME,
    handlers={JobLaunched: handle},
    build_deps=build,
    indexes=(*jobs.INDEXES, *EXPORT_INDEXES),
    background=(follow,),
)
