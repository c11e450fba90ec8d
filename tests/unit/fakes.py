"""In-memory fakes of the ports (``wm.ports``), for the handlers' unit tests.

Each keeps the one rule of its real store a handler relies on (a unique id, a single final result, a
claim won once) and nothing else; mypy checks that each satisfies its Protocol where a deps dataclass is
built. ``fail_next`` on a fake makes its next call raise, as an outage would.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from schemas.applications import ApplicationDefinition, SinkDefinition
from schemas.events import Event, ExportOutcome, FileExportResult, FileRef, PayloadArrived
from wm.domain.discovery import Candidate, Joined, Placement, closes_at, file_id
from wm.domain.engines import EngineStatus, JobSpec
from wm.domain.exports import (
    ExportResult,
    ExportState,
    ExportTask,
    RedeliveryPolicy,
    final_result,
    kept_results,
    merge_results,
    requested_event,
)
from wm.domain.jobs import TERMINAL, Job, JobTransition, next_state
from wm.errors import NotFound, PermanentError, TransientError
from wm.ports import EventPublisher


def _now() -> datetime:
    return datetime.now(UTC)


class Outage:
    """Lets a test make a fake's next call fail like an unreachable service."""

    def __init__(self) -> None:
        self._failures: list[Exception] = []

    def fail_next(self, error: Exception | None = None) -> None:
        """The next call raises ``error`` (a ``TransientError`` by default)."""
        self._failures.append(error or TransientError("service down"))

    def _maybe_fail(self) -> None:
        if self._failures:
            raise self._failures.pop(0)


@dataclass
class Published:
    event: Event
    message_id: str | None


class FakePublisher(Outage):
    """Records what was published, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.published: list[Published] = []
        self.changed = asyncio.Event()

    async def publish(self, event: Event, *, message_id: str | None = None) -> str:
        self._maybe_fail()
        self.published.append(Published(event, message_id))
        self.changed.set()
        return message_id or "generated"

    def of(self, event_type: type[Event]) -> list[Published]:
        """What was published of one event type."""
        return [p for p in self.published if isinstance(p.event, event_type)]


class FakeCatalog(Outage):
    """A fixed list of candidate applications."""

    def __init__(self, *candidates: Candidate) -> None:
        super().__init__()
        self.entries = list(candidates)

    async def candidates(self, event: PayloadArrived) -> list[Candidate]:
        self._maybe_fail()
        return list(self.entries)


@dataclass(frozen=True)
class Revision:
    definition: ApplicationDefinition


class FakeRevisions:
    """Application revisions by (name, revision)."""

    def __init__(self, *definitions: ApplicationDefinition) -> None:
        self.revisions = {(d.name, 1): Revision(d) for d in definitions}

    async def revision(self, name: str, revision: int) -> Revision:
        try:
            return self.revisions[(name, revision)]
        except KeyError:
            raise NotFound(f"application {name} r{revision} does not exist") from None


class FakeSinks:
    """Sink definitions by name."""

    def __init__(self, *sinks: SinkDefinition) -> None:
        self.sinks = {sink.name: sink for sink in sinks}

    async def get(self, name: str) -> SinkDefinition:
        try:
            return self.sinks[name]
        except KeyError:
            raise NotFound(f"sink {name} does not exist") from None


class FakeEngine(Outage):
    """An engine whose jobs take the phase a test gives them; a launch is idempotent per job id."""

    name = "fake"

    def __init__(self) -> None:
        super().__init__()
        self.launched: dict[str, JobSpec] = {}
        self.launches = 0
        self.phases: dict[str, EngineStatus] = {}
        self.cancelled: list[str] = []

    async def validate(self, application: ApplicationDefinition) -> list[str]:
        return []

    async def launch(self, job: JobSpec) -> str:
        self._maybe_fail()
        self.launches += 1
        self.launched[job.job_id] = job
        return f"engine-{job.job_id}"

    async def status(self, engine_job_id: str) -> EngineStatus:
        self._maybe_fail()
        return self.phases.get(engine_job_id, EngineStatus("pending"))

    async def cancel(self, engine_job_id: str) -> None:
        self._maybe_fail()
        self.cancelled.append(engine_job_id)

    async def cleanup(self, engine_job_id: str) -> None:
        pass


class FakeEngines:
    """One engine, under the name applications use (``local``)."""

    def __init__(self, engine: FakeEngine, name: str = "local") -> None:
        self._engines = {name: engine}

    def engine(self, name: str) -> FakeEngine:
        try:
            return self._engines[name]
        except KeyError:
            raise PermanentError(f"unknown engine {name!r}") from None


class FakeObjects(Outage):
    """Objects by key, in one bucket."""

    def __init__(self, bucket: str = "mwm-test") -> None:
        super().__init__()
        self.bucket = bucket
        self.objects: dict[str, FileRef] = {}

    def put(self, key: str, size: int = 1) -> FileRef:
        self.objects[key] = FileRef(bucket=self.bucket, key=key, size=size)
        return self.objects[key]

    async def copy(self, source_key: str, target_key: str, source_bucket: str | None = None) -> None:
        self._maybe_fail()
        source = self.objects.get(source_key)
        if source is None:
            raise NotFound(f"object {source_key} does not exist")
        self.objects[target_key] = source.model_copy(update={"key": target_key})

    async def list(self, prefix: str) -> list[FileRef]:
        self._maybe_fail()
        return [ref for key, ref in sorted(self.objects.items()) if key.startswith(prefix)]


@dataclass
class FakeBucket:
    bucket_id: str
    closes_at: datetime
    files: dict[str, PayloadArrived] = field(default_factory=dict)


class FakeBuckets(Outage):
    """Open buckets: the first generation of each key, files unique by file id."""

    def __init__(self) -> None:
        super().__init__()
        self.buckets: dict[str, FakeBucket] = {}

    async def add_file(self, placement: Placement, event: PayloadArrived) -> Joined:
        self._maybe_fail()
        due = closes_at(_now(), placement.quiet_period_s)
        bucket = self.buckets.setdefault(placement.bucket_key, FakeBucket(placement.bucket_id(0), due))
        bucket.files.setdefault(file_id(placement, event), event)
        bucket.closes_at = max(bucket.closes_at, due)
        return Joined(bucket.bucket_id, bucket.closes_at)


class FakeTimers:
    """Armed quiet-period timers."""

    def __init__(self) -> None:
        self.armed: dict[str, datetime] = {}

    def arm(self, bucket_id: str, due: datetime) -> None:
        self.armed[bucket_id] = max(due, self.armed.get(bucket_id, due))

    async def run(self, stop: asyncio.Event) -> None:
        await stop.wait()


class FakeJobs(Outage):
    """Jobs, their check schedule and their finish claims; transitions through the domain state machine."""

    def __init__(self) -> None:
        super().__init__()
        self.jobs: dict[str, Job] = {}
        self.due: dict[str, datetime] = {}
        self.finishes: dict[str, datetime] = {}
        self.published_finishes: set[str] = set()

    async def create(self, job: Job) -> Job:
        self._maybe_fail()
        job = self.jobs.setdefault(job.job_id, job)
        if not job.terminal:
            self.due.setdefault(job.job_id, job.created_at)
        return job

    async def get(self, job_id: str) -> Job:
        self._maybe_fail()
        try:
            return self.jobs[job_id]
        except KeyError:
            raise NotFound(f"job {job_id} does not exist") from None

    async def apply(
        self, job_id: str, transition: JobTransition, *, current: Job | None = None, **fields: object
    ) -> Job:
        self._maybe_fail()
        job = self.jobs[job_id]  # the stored state decides, whatever ``current`` says
        state = next_state(job.state, transition)
        job = job.model_copy(update={"state": state, **fields})
        if state in TERMINAL:
            job = job.model_copy(update={"finished_at": job.finished_at or _now()})
            self.due.pop(job_id, None)
        self.jobs[job_id] = job
        return job

    async def check_again_at(self, job_id: str, when: datetime) -> None:
        self._maybe_fail()
        self.due[job_id] = when

    async def due_for_check(self, now: datetime) -> list[Job]:
        self._maybe_fail()
        return [self.jobs[job_id] for job_id, when in sorted(self.due.items()) if when <= now]

    async def watch_unfinished(self) -> int:
        self._maybe_fail()
        missing = [j for j in self.jobs.values() if not j.terminal and j.job_id not in self.due]
        for job in missing:
            self.due[job.job_id] = _now()
        return len(missing)

    async def claim_finish(self, job_id: str) -> bool:
        self._maybe_fail()
        if job_id in self.finishes:
            return False
        self.finishes[job_id] = _now()
        return True

    async def stale_finishes(self, older_than: timedelta) -> list[str]:
        self._maybe_fail()
        cutoff = _now() - older_than
        return [j for j, at in self.finishes.items() if j not in self.published_finishes and at <= cutoff]

    async def reclaim_finish(self, job_id: str, older_than: timedelta) -> bool:
        self._maybe_fail()
        if job_id in self.published_finishes or self.finishes[job_id] > _now() - older_than:
            return False
        self.finishes[job_id] = _now()
        return True

    async def renew_finish(self, job_id: str) -> None:
        self._maybe_fail()
        if job_id in self.finishes and job_id not in self.published_finishes:
            self.finishes[job_id] = _now()

    async def release_finish(self, job_id: str) -> None:
        self._maybe_fail()
        if job_id not in self.published_finishes:
            self.finishes.pop(job_id, None)

    async def mark_finish_published(self, job_id: str) -> None:
        self._maybe_fail()
        self.published_finishes.add(job_id)


class FakeExportTasks(Outage):
    """Export tasks: a unique create, one live lease per task, a final result written once."""

    def __init__(self) -> None:
        super().__init__()
        self.tasks: dict[str, ExportTask] = {}

    def change(self, task_id: str, **changes: object) -> ExportTask:
        """Change a stored task's fields (a test ages a lease this way)."""
        self.tasks[task_id] = self.tasks[task_id].model_copy(update={"updated_at": _now(), **changes})
        return self.tasks[task_id]

    async def create(self, task: ExportTask) -> bool:
        self._maybe_fail()
        if task.export_task_id in self.tasks:
            return False
        self.tasks[task.export_task_id] = task
        return True

    async def get(self, task_id: str) -> ExportTask:
        self._maybe_fail()
        try:
            return self.tasks[task_id]
        except KeyError:
            raise NotFound(f"export task {task_id!r} not found") from None

    async def claim_task(self, task_id: str, owner: str, lease_s: float) -> ExportTask | None:
        task = await self.get(task_id)
        lease = task.held_lease
        if task.is_final or (lease is not None and lease.owner != owner and lease.expires_at > _now()):
            return None
        return self.change(
            task_id,
            state=ExportState.in_progress,
            lease_owner=owner,
            lease_expires_at=_now() + timedelta(seconds=lease_s),
            lease_number=task.lease_number + 1,
            attempts=task.attempts + 1,
        )

    async def record_result(
        self,
        task_id: str,
        outcome: ExportOutcome,
        results: list[FileExportResult],
        message: str = "",
        owner: str | None = None,
    ) -> ExportTask:
        task = await self.get(task_id)
        if task.is_final or (owner is not None and task.lease_owner != owner):
            return task
        return self.change(
            task_id,
            state=ExportState(outcome),
            file_results=results,
            message=message,
            completed_at=_now(),
            lease_owner=None,
            lease_expires_at=None,
            completion_published=False,
        )

    async def release(self, task_id: str, owner: str) -> bool:
        task = await self.get(task_id)
        if task.state is not ExportState.in_progress or task.lease_owner != owner:
            return False
        self.change(task_id, state=ExportState.pending, lease_owner=None, lease_expires_at=None)
        return True

    async def mark_published(self, task_id: str) -> None:
        self._maybe_fail()
        self.change(task_id, completion_published=True)

    async def expire(self) -> list[ExportTask]:
        self._maybe_fail()
        now = _now()
        expired = [t.export_task_id for t in self.tasks.values() if t.lease_expired(now)]
        return [
            self.change(task_id, state=ExportState.pending, lease_owner=None, lease_expires_at=None)
            for task_id in expired
        ]

    async def watch_open(self) -> int:
        self._maybe_fail()
        return 0  # the fake reads its tasks directly: nothing to watch


class FakeExportRetries(Outage):
    """Redelivery timers of deferred tasks, over the same tasks as ``FakeExportTasks``."""

    def __init__(self, tasks: FakeExportTasks) -> None:
        super().__init__()
        self.tasks = tasks
        self.timers: dict[str, datetime] = {}

    async def defer(
        self,
        task: ExportTask,
        owner: str,
        results: list[FileExportResult],
        reason: str,
        policy: RedeliveryPolicy,
    ) -> ExportTask | None:
        self._maybe_fail()
        now = _now()
        since = task.retrying_since or now
        due = policy.next_at(since, task.retries, now)
        if due is None:
            return None
        kept = merge_results(task.files, kept_results(task.file_results), kept_results(results))
        self.timers[task.export_task_id] = due
        self.tasks.change(
            task.export_task_id,
            file_results=kept,
            message=reason,
            retrying_since=since,
            retries=task.retries + 1,
            retry_at=due,
        )
        await self.tasks.release(task.export_task_id, owner)
        return await self.tasks.get(task.export_task_id)

    async def due(self, now: datetime, limit: int = 100) -> list[tuple[str, datetime]]:
        self._maybe_fail()
        return sorted(((t, at) for t, at in self.timers.items() if at <= now), key=lambda item: item[1])[
            :limit
        ]

    async def redeliver(self, task_id: str, due_at: datetime, bus: EventPublisher) -> bool:
        task = await self.tasks.get(task_id)
        if not task.is_final:
            await bus.publish(requested_event(task), message_id=f"{task_id}.requested.retry{task.retries}")
        if self.timers.get(task_id) == due_at:
            del self.timers[task_id]
        return not task.is_final


class NoFiles:
    """A sink's file source (``wm.ports.FileSource``) for sinks that must not read any file."""

    async def download_file(self, key: str, path: Path) -> None:
        raise AssertionError("not used")

    async def fetch(self, key: str, path: Path, hold: Callable[[int], bool]) -> bytes | None:
        raise AssertionError("not used")


class FakeSink:
    """A sink that reports the outcome a test sets per key (``succeeded`` by default)."""

    def __init__(self, definition: SinkDefinition, failing: Sequence[str] = ()) -> None:
        self.definition = definition
        self.failing = set(failing)
        self.sent: list[list[str]] = []
        self.error: Exception | None = None

    async def export(self, files: Sequence[FileRef]) -> ExportResult:
        self.sent.append([file.key for file in files])
        if self.error is not None:
            raise self.error
        reported = [
            FileExportResult(key=f.key, status="failed", error="refused")
            if f.key in self.failing
            else FileExportResult(key=f.key, status="succeeded")
            for f in files
        ]
        return final_result(files, reported)
