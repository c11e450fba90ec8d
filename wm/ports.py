"""What the handlers need from outside, one Protocol each, with exactly the operations they use.

Stores and adapters satisfy them structurally (no inheritance), and so do the in-memory fakes of
``tests/unit/fakes.py``. This module imports only the domain (``wm.domain``, ``schemas``, ``wm.errors``): an
import-linter contract (``[tool.importlinter]`` in ``pyproject.toml``) keeps it that way.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Protocol

from schemas.applications import ApplicationDefinition, SinkDefinition
from schemas.events import Event, ExportOutcome, FileExportResult, FileRef, PayloadArrived
from schemas.monai_ig import IgMessage
from wm.domain.discovery import Candidate, Joined, Placement
from wm.domain.engines import EngineStatus, JobSpec
from wm.domain.exports import ExportResult, ExportTask, RedeliveryPolicy
from wm.domain.jobs import Job, JobTransition
from wm.domain.monai_ig import IgExport


class EventPublisher(Protocol):
    """Publishes events with broker confirms (``wm.adapters.rabbitmq.Bus``)."""

    async def publish(self, event: Event, *, message_id: str | None = None) -> str:
        """Publish ``event``; ``message_id`` derived from a business key makes re-publishing recognisable."""
        ...


class ApplicationCatalog(Protocol):
    """The registered applications a file may trigger (``wm.stores.catalog.RegistryCatalog``)."""

    async def candidates(self, event: PayloadArrived) -> list[Candidate]:
        """Latest active revisions of the applications the event names, or mapped to its called AE."""
        ...


class ApplicationRevisionView(Protocol):
    """A stored application revision."""

    @property
    def definition(self) -> ApplicationDefinition: ...


class ApplicationRevisions(Protocol):
    """Application definitions by name and revision (history stays readable after a delete)."""

    async def revision(self, name: str, revision: int) -> ApplicationRevisionView:
        """The definition of one revision; ``NotFound`` if it never existed."""
        ...


class SinkDirectory(Protocol):
    """Export sink definitions by name (``wm.registry.sinks.Sinks``)."""

    async def get(self, name: str) -> SinkDefinition:
        """The sink ``name``; ``NotFound`` when there is none."""
        ...


class Engine(Protocol):
    """An orchestration engine plugin (entry-point group ``mwm.engines``)."""

    name: str

    async def validate(self, application: ApplicationDefinition) -> list[str]:
        """Problems that would stop the application from running here (empty when it can run)."""
        ...

    async def launch(self, job: JobSpec) -> str:
        """Start the job; returns the engine's job id. Idempotent for the same ``job.job_id``."""
        ...

    async def status(self, engine_job_id: str) -> EngineStatus:
        """The job's phase, message and (when it succeeded) outputs."""
        ...

    async def cancel(self, engine_job_id: str) -> None:
        """Stop the job; a job that is already gone is not an error."""
        ...

    async def cleanup(self, engine_job_id: str) -> None:
        """Release what the engine holds for a finished job."""
        ...


class EngineDirectory(Protocol):
    """Orchestration engines by name (``wm.engines.LoadedEngines``)."""

    def engine(self, name: str) -> Engine:
        """The engine plugin ``name``."""
        ...


class FileSource(Protocol):
    """Where a sink reads the files it exports (``wm.adapters.objectstore.ObjectStore``)."""

    async def download_file(self, key: str, path: Path) -> None:
        """Download the object ``key`` to the local file ``path``."""
        ...

    async def fetch(self, key: str, path: Path, hold: Callable[[int], bool]) -> bytes | None:
        """The object ``key``: its bytes if ``hold`` (asked, from any thread, with the object's size) says
        to hold them in memory, else downloaded to ``path`` and None (a source may always download)."""
        ...


class ObjectStorage(Protocol):
    """The object-store operations of the scheduler and the monitor (``ObjectStore``)."""

    async def copy(self, source_key: str, target_key: str, source_bucket: str | None = None) -> None:
        """Copy an object server-side, from this bucket or ``source_bucket`` (idempotent)."""
        ...

    async def list(self, prefix: str) -> list[FileRef]:
        """The objects under ``prefix``."""
        ...


class BucketObjects(Protocol):
    """One bucket of the object store as the IG consumers read and fill it (``ObjectStore``)."""

    bucket: str

    def in_bucket(self, bucket: str) -> BucketObjects:
        """The same store on another bucket of the same server."""
        ...

    async def copy(self, source_key: str, target_key: str, source_bucket: str | None = None) -> None:
        """Copy an object server-side, from this bucket or ``source_bucket`` (idempotent)."""
        ...

    async def list(self, prefix: str) -> list[FileRef]:
        """The objects under ``prefix``."""
        ...

    def stream(self, key: str, chunk_size: int = ...) -> AsyncIterator[bytes]:
        """The object's bytes, chunk by chunk."""
        ...

    async def download_file(self, key: str, path: Path) -> None:
        """Download the object ``key`` to the local file ``path``."""
        ...


class IgTaskPublisher(Protocol):
    """Publishes to a MONAI Informatics Gateway's exchange (``wm.adapters.monai_ig.IgPublisher``)."""

    async def publish(self, body: IgMessage, routing_key: str, correlation_id: str) -> str:
        """Publish ``body`` with the properties the IG requires; the message id it went out with."""
        ...

    async def run(self, stop: asyncio.Event) -> None:
        """Keep the connection to the IG's broker until ``stop`` is set."""
        ...


class IgExportRecords(Protocol):
    """Export tasks handed to the IG, and the claims on announcing their end (``wm.stores.ig_exports``)."""

    async def begin(self, export: IgExport) -> None:
        """Record the hand-off before publishing it; ``Duplicate`` when the task was handed off already."""
        ...

    async def published(self, task_id: str) -> None:
        """The broker confirmed the request."""
        ...

    async def abandon(self, task_id: str) -> None:
        """The publish failed before the broker took it: the next attempt may hand the task off again."""
        ...

    async def get(self, task_id: str) -> IgExport:
        """The hand-off of a task; ``NotFound`` when MWM never handed that task to the IG."""
        ...

    async def resolve(self, task_id: str) -> None:
        """The task's result is recorded (completion or deadline): nothing waits for it any more."""
        ...

    async def overdue(self, now: datetime) -> list[IgExport]:
        """Unresolved hand-offs past their deadline."""
        ...

    async def claim_announcement(self, message_id: str, task_id: str) -> bool:
        """True for exactly one caller per ``export.completed`` message id: the one that publishes it."""
        ...

    async def release_announcement(self, message_id: str) -> None:
        """Drop an unconfirmed claim (its publish failed): the next attempt may claim it again."""
        ...

    async def mark_announced(self, message_id: str) -> None:
        """The claimed ``export.completed`` was published (confirmed by the broker)."""
        ...

    async def stale_announcements(self, older_than: timedelta) -> list[tuple[str, str]]:
        """Claims not confirmed within ``older_than`` (the claimer died): (message id, task id) pairs."""
        ...

    async def reclaim_announcement(self, message_id: str, older_than: timedelta) -> bool:
        """Take over a stale claim; True for the caller that wins."""
        ...


class Sink(Protocol):
    """An export destination (``wm.sinks.ExportSink``)."""

    async def export(self, files: Sequence[FileRef]) -> ExportResult:
        """Send the files; the outcome and a result for every file of ``files``, in order."""
        ...


SinkOpener = Callable[[SinkDefinition], Sink]
"""Builds the sink a definition describes (``PermanentError`` when its type is unknown)."""


class BucketRecords(Protocol):
    """Open buckets and their files (``wm.stores.buckets.BucketStore``)."""

    async def add_file(self, placement: Placement, event: PayloadArrived) -> Joined:
        """Add a file to the open generation of its bucket (idempotent for a redelivered event)."""
        ...


class QuietPeriodTimers(Protocol):
    """Close buckets when their quiet period ends (``wm.service_layer.timers.BucketTimers``)."""

    def arm(self, bucket_id: str, due: datetime) -> None:
        """Close ``bucket_id`` at ``due`` unless more files move it later."""
        ...

    async def run(self, stop: asyncio.Event) -> None:
        """Fire armed timers and sweep for due buckets until ``stop`` is set."""
        ...


class JobRecords(Protocol):
    """Job persistence as the scheduler and the monitor use it (``wm.stores.jobs.JobStore``)."""

    async def create(self, job: Job) -> Job:
        """Insert the job, or return the one that already exists under its id."""
        ...

    async def get(self, job_id: str) -> Job:
        """The job; ``NotFound`` if there is none."""
        ...

    async def apply(
        self, job_id: str, transition: JobTransition, *, current: Job | None = None, **fields: object
    ) -> Job:
        """Move the job through ``transition`` (a repeat is a no-op; an illegal one raises ``Conflict``)."""
        ...

    async def check_again_at(self, job_id: str, when: datetime) -> None:
        """Schedule the job's next status check."""
        ...

    async def due_for_check(self, now: datetime) -> list[Job]:
        """Jobs an engine is running whose next status check is due."""
        ...

    async def watch_unfinished(self) -> int:
        """Watch every unfinished job that is not watched; how many were added."""
        ...

    async def claim_finish(self, job_id: str) -> bool:
        """True for exactly one caller per job: the one that publishes its end."""
        ...

    async def stale_finishes(self, older_than: timedelta) -> list[str]:
        """Finishes claimed but not published in time (the claimer died)."""
        ...

    async def reclaim_finish(self, job_id: str, older_than: timedelta) -> bool:
        """Take over a stale finish; True for the one caller that wins."""
        ...

    async def renew_finish(self, job_id: str) -> None:
        """The claimer is still at work: its unpublished claim is fresh again."""
        ...

    async def release_finish(self, job_id: str) -> None:
        """Drop an unpublished finish claim, so the job's next check can claim its end again."""
        ...

    async def mark_finish_published(self, job_id: str) -> None:
        """The end of the job was published (confirmed by the broker)."""
        ...


class ExportTaskRecords(Protocol):
    """Export tasks as the monitor and the exporter use them (``wm.stores.exports.ExportTasks``)."""

    async def create(self, task: ExportTask) -> bool:
        """Insert the task; False when a task with its id exists already."""
        ...

    async def get(self, task_id: str) -> ExportTask:
        """The task; ``NotFound`` when there is none."""
        ...

    async def claim_task(self, task_id: str, owner: str, lease_s: float) -> ExportTask | None:
        """Take this task under a lease; None when it is final or another owner holds it."""
        ...

    async def record_result(
        self, task_id: str, outcome: ExportOutcome, results: list[FileExportResult], message: str = ""
    ) -> ExportTask:
        """Make the task final (once: a final task keeps its first result); the task as stored."""
        ...

    async def release(self, task_id: str, owner: str) -> bool:
        """End ``owner``'s live lease on the task; False if it held none."""
        ...

    async def mark_published(self, task_id: str) -> None:
        """The task's ``export.completed`` was published (confirmed by the broker)."""
        ...

    async def expire(self) -> list[ExportTask]:
        """Put tasks whose lease expired back to pending; returns them."""
        ...

    async def watch_open(self) -> int:
        """Put open tasks missing from the watch list on it; how many (once per start)."""
        ...


class ExportRedeliveries(Protocol):
    """Deferred export tasks and their redelivery timers (``wm.stores.export_retry.ExportRetries``)."""

    async def defer(
        self,
        task: ExportTask,
        owner: str,
        results: list[FileExportResult],
        reason: str,
        policy: RedeliveryPolicy,
    ) -> ExportTask | None:
        """Give the held ``task`` back until its next redelivery; None once its window is over."""
        ...

    async def due(self, now: datetime, limit: int = 100) -> list[tuple[str, datetime]]:
        """Timers that are due: (task id, due time)."""
        ...

    async def redeliver(self, task_id: str, due_at: datetime, bus: EventPublisher) -> bool:
        """Request a due task again and drop its timer; False when it needed nothing."""
        ...
