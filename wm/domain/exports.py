"""Export tasks, pure: states, the outcome of a task from its per-file results, extension filtering.

    pending --claim--> in_progress --record_result--> succeeded | partial | failed
       |                   |  ^
       |                   +--+ lease expired or released: back to pending (claimable again)
       +--record_result (e.g. the exporter gave up before claiming)--> failed

Final states accept nothing: a second final update leaves the first result in place. Two ways back to
``pending`` keep what was sent: a destination that is unavailable (refused, aborted, timed out) defers the
task to a delayed redelivery (``RedeliveryPolicy``, within a window); an operator's retry of a ``failed`` or
``partial`` task (``mwm exports retry``) reopens it. Either way only the files not sent yet are sent again.

How an outcome is decided (`export_outcome`, only through `final_result`), per file ``succeeded`` /
``failed`` / ``skipped``:

- ``skipped`` files (filtered out by the sink's ``extensions``) are not failures: the sink did everything it
  was configured to do with them. A task whose files are all skipped (or that has no files) *succeeded*.
- at least one ``failed`` and at least one ``succeeded`` -> ``partial``;
- at least one ``failed`` and none ``succeeded`` -> ``failed``;
- otherwise -> ``succeeded``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any, NamedTuple, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from schemas.events import ExportCompleted, ExportOutcome, ExportRequested, FileExportResult, FileRef, SinkRef
from wm.domain.backoff import delay_s

T = TypeVar("T")


class ExportState(StrEnum):
    """Where an export task is in its life."""

    pending = "pending"
    in_progress = "in_progress"
    succeeded = "succeeded"
    partial = "partial"
    failed = "failed"


FINAL_STATES = frozenset({ExportState.succeeded, ExportState.partial, ExportState.failed})
OPEN_STATES = frozenset({ExportState.pending, ExportState.in_progress})
_OUTCOMES: dict[ExportState, ExportOutcome] = {
    ExportState.succeeded: "succeeded",
    ExportState.partial: "partial",
    ExportState.failed: "failed",
}

NO_RESULT = "no result: the sink did not report on this file"


class Lease(BaseModel):
    """A claim on a task: its holder, its number (the token a pull client quotes back) and its end."""

    model_config = ConfigDict(frozen=True)

    owner: str
    number: int
    expires_at: datetime


class ExportTask(BaseModel):
    """One job's files for one sink, and what became of them.

    ``lease_owner`` / ``lease_expires_at`` mirror the live lease (the truth is the ``export_leases``
    collection); ``lease_number`` is the number the next lease will take. ``completion_published`` is the
    outbox flag: the final state is written first, ``export.completed`` published next, then this is set.
    """

    model_config = ConfigDict(frozen=True)

    export_task_id: str
    job_id: str
    application_id: str
    correlation_id: str
    sink: SinkRef
    files: list[FileRef]
    state: ExportState = ExportState.pending
    file_results: list[FileExportResult] = Field(default_factory=list)
    message: str = ""
    attempts: int = 0
    created_at: datetime
    updated_at: datetime
    completed_at: datetime | None = None
    lease_owner: str | None = None
    lease_expires_at: datetime | None = None
    lease_number: int = 0
    completion_published: bool = False
    retries: int = 0
    """Delayed redeliveries so far while the destination was unavailable (``RedeliveryPolicy``)."""
    retrying_since: datetime | None = None
    """When the destination was first found unavailable; the redelivery window counts from here."""
    retry_at: datetime | None = None
    """When the next delayed redelivery is due (None when none is waiting)."""
    reruns: int = 0
    """How many times an operator retried the task after it ended (``mwm exports retry``)."""

    @property
    def is_final(self) -> bool:
        """Whether the task reached succeeded, partial or failed."""
        return self.state in FINAL_STATES

    def lease_expired(self, now: datetime) -> bool:
        """Whether the task is in progress under a lease that ran out before ``now`` (its holder died)."""
        expires_at = self.lease_expires_at
        return self.state is ExportState.in_progress and expires_at is not None and expires_at < now

    def claimable(self, now: datetime) -> bool:
        """Whether nobody holds the open task at ``now``: pending, or under a lease that expired."""
        return self.state is ExportState.pending or self.lease_expired(now)

    @property
    def held_lease(self) -> Lease | None:
        """The lease the task is held under, as mirrored on the task; None when nobody holds it."""
        if self.state is not ExportState.in_progress or self.lease_owner is None:
            return None
        if self.lease_expires_at is None:
            return None
        return Lease(owner=self.lease_owner, number=self.lease_number - 1, expires_at=self.lease_expires_at)


def _request(source: ExportTask | ExportRequested) -> dict[str, Any]:
    """What an ``export.requested`` and its task share: all a pending task is made of (the event is
    self-contained)."""
    return {
        "correlation_id": source.correlation_id,
        "export_task_id": source.export_task_id,
        "job_id": source.job_id,
        "application_id": source.application_id,
        "sink": source.sink,
        "files": list(source.files),
    }


def task_for(event: ExportRequested, now: datetime) -> ExportTask:
    """The pending task an ``ExportRequested`` describes."""
    return ExportTask.model_validate({**_request(event), "created_at": now, "updated_at": now})


def completed_event(task: ExportTask) -> ExportCompleted:
    """The ``export.completed`` of a final task."""
    if not task.is_final:
        raise ValueError(f"export task {task.export_task_id} is {task.state}, not final")
    return ExportCompleted(
        correlation_id=task.correlation_id,
        export_task_id=task.export_task_id,
        job_id=task.job_id,
        sink=task.sink,
        status=_OUTCOMES[task.state],
        message=task.message,
        file_results=task.file_results,
    )


def requested_event(task: ExportTask) -> ExportRequested:
    """The ``export.requested`` that asks for ``task`` again (after its lease expired)."""
    return ExportRequested.model_validate(_request(task))


def summary(results: Sequence[FileExportResult]) -> str:
    """A one-line account of per-file results, e.g. ``3 succeeded, 1 failed (first: C-STORE status ...)``."""
    statuses = ("succeeded", "failed", "skipped")
    counts = {status: sum(1 for r in results if r.status == status) for status in statuses}
    text = ", ".join(f"{count} {status}" for status, count in counts.items() if count)
    first_error = next((r.error for r in results if r.status == "failed" and r.error), None)
    return f"{text} (first error: {first_error})" if first_error else text


def completed_message_id(task_id: str, reruns: int = 0) -> str:
    """The message id of a task's ``export.completed``: a re-publish is recognisably the same message.

    A task an operator retried completes again under a message id of its own (``reruns``).
    """
    return f"{task_id}.completed" if reruns == 0 else f"{task_id}.completed.r{reruns}"


def export_outcome(results: Iterable[FileExportResult]) -> ExportOutcome:
    """The task's outcome from its per-file results (see the module docstring)."""
    statuses = {result.status for result in results}
    if "failed" not in statuses:
        return "succeeded"
    return "partial" if "succeeded" in statuses else "failed"


def wanted_by(extensions: Sequence[str], key: str) -> bool:
    """Whether a sink with ``extensions`` exports ``key``; an empty list exports everything.

    Case-insensitive, and an extension may be written with or without its dot (``.dcm`` or ``dcm``).
    """
    if not extensions:
        return True
    name = key.rsplit("/", 1)[-1].lower()
    return any(name.endswith("." + extension.lower().lstrip(".")) for extension in extensions)


def split_by_extension(
    files: Sequence[FileRef], extensions: Sequence[str]
) -> tuple[list[FileRef], list[FileExportResult]]:
    """The files to send, and a ``skipped`` result for every other one."""
    wanted = [file for file in files if wanted_by(extensions, file.key)]
    skipped = [
        FileExportResult(key=file.key, status="skipped", error=f"extension not in {list(extensions)}")
        for file in files
        if not wanted_by(extensions, file.key)
    ]
    return wanted, skipped


def complete_results(files: Sequence[FileRef], results: Iterable[FileExportResult]) -> list[FileExportResult]:
    """Exactly one result per file, in the files' order: a file the sink did not report on failed.

    When a sink reports a key twice, the last report wins; reports on keys not in ``files`` are dropped.
    """
    by_key = {result.key: result for result in results}
    return [
        by_key.get(file.key) or FileExportResult(key=file.key, status="failed", error=NO_RESULT)
        for file in files
    ]


def merge_results(files: Sequence[FileRef], *reports: Iterable[FileExportResult]) -> list[FileExportResult]:
    """The results reported so far over several reports, one per reported file, in the files' order.

    A later report on a key replaces an earlier one; reports on keys not in ``files`` are dropped.
    """
    by_key = {result.key: result for report in reports for result in report}
    return [by_key[file.key] for file in files if file.key in by_key]


class ExportResult(NamedTuple):
    """A task's final result: its outcome, exactly one result per file (in the files' order), a summary."""

    outcome: ExportOutcome
    results: list[FileExportResult]
    message: str


def final_result(
    files: Sequence[FileRef], reported: Iterable[FileExportResult], outcome: ExportOutcome | None = None
) -> ExportResult:
    """A task's final result from what was reported: a result per file; outcome computed unless given.

    The one place an export's outcome is decided: the sinks (``ExportSink.export``), the exporter and the
    pull clients' final update (``ExportTasks.finish``) all come here.
    """
    results = complete_results(files, reported)
    return ExportResult(outcome or export_outcome(results), results, summary(results))


def failed_result(files: Sequence[FileRef], reason: str) -> ExportResult:
    """The export could not be attempted at all: every file failed with ``reason``."""
    return ExportResult(
        "failed", [FileExportResult(key=f.key, status="failed", error=reason) for f in files], reason
    )


def lane_count(items: int, lanes: int, min_per_lane: int) -> int:
    """How many of at most ``lanes`` lanes ``items`` fill with at least ``min_per_lane`` each (at least 1)."""
    return max(1, min(lanes, items // max(min_per_lane, 1)))


def split_evenly(items: Sequence[T], lanes: int, min_per_lane: int) -> list[list[T]]:
    """``items`` dealt into at most ``lanes`` contiguous runs, each at least ``min_per_lane`` long.

    Contiguous runs keep a series' instances in order on one association. Never returns an empty run.
    """
    count = lane_count(len(items), lanes, min_per_lane)
    size, extra = divmod(len(items), count)
    runs, start = [], 0
    for index in range(count):
        end = start + size + (1 if index < extra else 0)
        runs.append(list(items[start:end]))
        start = end
    return [run for run in runs if run]


def unsent(files: Sequence[FileRef], results: Iterable[FileExportResult]) -> list[FileRef]:
    """The files that still have to be sent: every one without a ``succeeded`` or ``skipped`` result."""
    done = {result.key for result in results if result.status != "failed"}
    return [file for file in files if file.key not in done]


def kept_results(results: Iterable[FileExportResult]) -> list[FileExportResult]:
    """The results a retry keeps: the files that got to their destination (or were meant to be skipped)."""
    return [result for result in results if result.status != "failed"]


@dataclass(frozen=True)
class RedeliveryPolicy:
    """How long and how often an export is tried again while its destination is unavailable.

    Exponential backoff with additive jitter (``wm.domain.backoff``): the n-th redelivery
    waits about ``initial_s * 2**(n-1)``, at most ``max_s``, plus up to ``initial_s`` of jitter, so the
    exports of many tasks that failed together do not all come back at the same instant. After
    ``window_s`` from the first failure the task fails.
    """

    window_s: float
    initial_s: float
    max_s: float

    def delay_s(self, retries: int) -> float:
        """The wait before redelivery number ``retries + 1``."""
        return delay_s(retries + 1, self.initial_s, self.max_s)

    def next_at(self, since: datetime, retries: int, now: datetime) -> datetime | None:
        """When to try again; None once the window that started at ``since`` is over.

        A backoff that would end past the window is cut short: the last try is at the window's end, so a
        destination back just before it still gets its files.
        """
        end = since + timedelta(seconds=self.window_s)
        if now >= end:
            return None
        return min(now + timedelta(seconds=self.delay_s(retries)), end)
