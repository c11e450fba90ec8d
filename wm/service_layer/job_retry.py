"""Job retry: run an ended job again, on the inputs staged for it, as a new attempt.

For a job that failed, timed out or was cancelled (an engine outage longer than the retry budget, a
flaky application), so an operator does not have to resend the study from the modality. The inputs under
``jobs/<job id>/input/`` are used as staged; what the ended attempt left under its output prefix is
removed first, so the new attempt's outputs alone are exported. The attempt is launched on the engine
under its own name (``engine_job_name``), then recorded (``JobStore.begin_attempt``: the ended attempt
goes to the job's history) and announced with ``job.launched``; the monitor follows it from there as
any job. Only a succeeded job is exported, and a succeeded job cannot be retried, so the export happens
once, for the attempt that succeeded.

A launch that fails on an outage leaves the job as it was (ended): the retry can be asked again.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import structlog

from wm.adapters.objectstore import ObjectStore
from wm.domain.jobs import engine_job_name, launched_message_id, retry_refusal
from wm.engines import JobSpec
from wm.errors import Conflict
from wm.ports import ApplicationRevisions, EngineDirectory, EventPublisher
from wm.stores.jobs import Job, JobStore, launched_event

log = structlog.get_logger("wm.service_layer.job_retry")


@dataclass(frozen=True)
class RetryPorts:
    """What a retry reads and changes."""

    jobs: JobStore
    objects: ObjectStore
    engines: EngineDirectory
    applications: ApplicationRevisions
    publisher: EventPublisher


async def retry_job(job_id: str, ports: RetryPorts) -> Job:
    """Launch the next attempt of an ended job; ``Conflict`` when it cannot be retried (and why)."""
    job = await ports.jobs.get(job_id)
    refusal = retry_refusal(job.state, job.purged_at is not None)
    if refusal is None and not await ports.objects.list(job.input_prefix):
        refusal = f"no inputs are staged under {job.input_prefix}"
    if refusal is not None:
        raise Conflict(f"job {job_id} cannot be retried: {refusal}")
    revision = await ports.applications.revision(job.application_id, job.application_revision)
    application = revision.definition
    await ports.objects.remove_prefix(job.output_prefix)
    attempt = job.attempt + 1
    deadline = datetime.now(UTC) + timedelta(seconds=application.map.timeout_s)
    spec = JobSpec(
        engine_job_name(job_id, attempt),
        job.correlation_id,
        application,
        job.input_prefix,
        job.output_prefix,
        deadline,
    )
    engine_job_id = await ports.engines.engine(job.engine).launch(spec)
    retried = await ports.jobs.begin_attempt(job, engine_job_id, deadline)
    log.info("job_retried", job_id=job_id, attempt=retried.attempt, engine_job_id=engine_job_id)
    await ports.publisher.publish(launched_event(retried), message_id=launched_message_id(job_id, attempt))
    return retried
