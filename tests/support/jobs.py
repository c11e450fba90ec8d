"""Jobs made by the real pipeline, with the API serving them: for the jobs API and CLI tests."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

from consumers import discovery, monitor, scheduler
from devkit.dicom import write_ct_study
from devkit.peers import LOCALHOST
from devkit.pipeline import EventTap, arrive, consumers_running, mip_application, register, tap
from devkit.services import wait_for
from schemas.events import JobFinished, JobLaunched
from wm.api.app import create_app
from wm.api.server import running
from wm.config import Settings

SLEEPER = ["bash", "-c", "sleep 30"]
"""An application that runs until it is cancelled."""


@asynccontextmanager
async def pipeline_and_api(settings: Settings) -> AsyncIterator[EventTap]:
    """The API on ``settings.api.port`` and discovery, scheduler and monitor; a tap on job events."""
    async with (
        running(create_app(settings), LOCALHOST, settings.api.port),
        tap(settings, JobLaunched.event_type, JobFinished.event_type) as events,
        consumers_running(settings, [discovery.CONSUMER, scheduler.CONSUMER, monitor.CONSUMER]),
    ):
        yield events


async def launch_job(
    settings: Settings, events: EventTap, work: Path, name: str, command: Sequence[str] | None = None
) -> JobLaunched:
    """Register application ``name`` (the example MIP, or ``command``), send it a study; its job.launched."""
    ae_title = f"MWM-{name.upper()}"[:16]
    await register(settings, mip_application(name, ae_title, quiet_period_s=0.2, command=command))
    study = write_ct_study(work / name, series=1, slices_per_series=2, seed=len(name))
    await arrive(settings, study.files, called_ae=ae_title)

    async def launched() -> bool:
        return any(event.application_id == name for event in events.of(JobLaunched))

    await wait_for(launched, 30, f"job.launched of {name}")
    found: JobLaunched = next(e for e in events.of(JobLaunched) if e.application_id == name)
    return found


async def job_finished(events: EventTap, job_id: str, timeout: float = 60) -> JobFinished:
    """The job.finished of ``job_id``, once published."""

    async def finished() -> bool:
        return any(event.job_id == job_id for event in events.of(JobFinished))

    await wait_for(finished, timeout, f"job.finished of {job_id}")
    found: JobFinished = next(e for e in events.of(JobFinished) if e.job_id == job_id)
    return found
