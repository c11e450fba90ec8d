"""``/jobs``: list and read jobs, and ask for one to be cancelled.

``POST /jobs/{id}/retry`` (admin) runs a failed, timed-out or cancelled job again on its staged inputs as
a new attempt (`wm.service_layer.job_retry`); the job keeps the history of its attempts. 409 when the job
cannot be
retried (it succeeded, is still running, or its inputs were removed by retention).

A cancel is a request: it marks the job and makes it due for a status check; the monitor then cancels it
on its engine and publishes ``job.finished`` with the status ``cancelled`` (so ``POST /jobs/{id}/cancel``
answers 202, not 200). A job that already ended cannot be cancelled (409).
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, Field

from schemas.events import FileRef
from wm.api.deps import ADMIN, READ, BusDep, ObjectsDep, PageDep, RegistryDep, SettingsDep
from wm.domain.jobs import TERMINAL, Job, JobAttempt, JobState
from wm.engines import LoadedEngines
from wm.errors import Conflict
from wm.registry import Page
from wm.service_layer.job_retry import RetryPorts, retry_job
from wm.stores.jobs import JobStore

router = APIRouter(prefix="/jobs", tags=["jobs"])


class JobView(BaseModel):
    """A job as the API shows it."""

    id: str = Field(description="derived from the bucket id")
    bucket_id: str
    correlation_id: str
    application_id: str
    application_revision: int
    engine: str = Field(description="engine plugin name, e.g. local or argo")
    engine_job_id: str | None = Field(description="the engine's id, once launched")
    state: JobState
    message: str
    outputs: list[FileRef]
    cancel_requested: bool
    possibly_incomplete: bool = Field(
        description="the study may be incomplete: an aborted association's files, not resent in time"
    )
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None
    deadline: datetime = Field(description="the job is cancelled and timed out after this")
    attempt: int = Field(1, description="which run of the job this is (a retry starts the next)")
    attempts: list[JobAttempt] = Field(default_factory=list, description="earlier attempts, oldest first")

    @classmethod
    def of(cls, job: Job) -> JobView:
        """The view of a stored job."""
        excluded = {"job_id", "input_prefix", "output_prefix", "purged_at", "attempt_started_at"}
        return cls(id=job.job_id, **job.model_dump(exclude=excluded))


def job_store(request: Request) -> JobStore:
    """The jobs in the database opened by the app's lifespan."""
    return JobStore(request.app.state.database)


JobStoreDep = Annotated[JobStore, Depends(job_store)]


@router.get("", dependencies=READ)
async def list_jobs(
    jobs: JobStoreDep,
    page: PageDep,
    state: Annotated[JobState | None, Query(description="only jobs in this state")] = None,
    application: Annotated[str | None, Query(description="only jobs of this application")] = None,
) -> Page[JobView]:
    """Jobs, newest first."""
    found, total = await jobs.page(state, application, page.skip, page.page_size)
    return page.of([JobView.of(job) for job in found], total)


@router.get("/{job_id}", dependencies=READ)
async def get_job(job_id: str, jobs: JobStoreDep) -> JobView:
    """One job."""
    return JobView.of(await jobs.get(job_id))


@router.post("/{job_id}/cancel", status_code=202, dependencies=ADMIN)
async def cancel_job(job_id: str, jobs: JobStoreDep) -> JobView:
    """Ask for the job to be cancelled; the monitor cancels it on its engine and announces its end."""
    job = await jobs.get(job_id)
    if job.state in TERMINAL:
        raise Conflict(f"job {job_id} already ended: {job.state}")
    return JobView.of(await jobs.request_cancel(job_id))


def _engines(request: Request, settings: SettingsDep) -> LoadedEngines:
    """The engine plugins, built once per API process."""
    engines: LoadedEngines | None = getattr(request.app.state, "engines", None)
    if engines is None:
        engines = request.app.state.engines = LoadedEngines(settings)
    return engines


@router.post("/{job_id}/retry", status_code=202, dependencies=ADMIN)
async def retry(
    job_id: str,
    jobs: JobStoreDep,
    objects: ObjectsDep,
    registry: RegistryDep,
    bus: BusDep,
    engines: Annotated[LoadedEngines, Depends(_engines)],
) -> JobView:
    """Run an ended job again on its staged inputs, as a new attempt; the monitor follows it."""
    return JobView.of(await retry_job(job_id, RetryPorts(jobs, objects, engines, registry, bus)))
