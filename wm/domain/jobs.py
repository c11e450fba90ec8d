"""Jobs, pure: the `Job` model, its state machine, its events and the ids derived from business keys.

    created --launch--> launched --start--> running --succeed--> succeeded
       |                  |  |                 |  --fail-----> failed
       |                  |  +---(any of succeed/fail/cancel/time_out from launched too)
       +--fail (launch kept failing)--> failed
    cancel: created|launched|running -> cancelled;  time_out: launched|running -> timed_out

    retry (a new attempt): failed|cancelled|timed_out -> launched (``RETRYABLE``; see
    ``wm.service_layer.job_retry``)

Terminal states accept nothing (a retry starts a new attempt of the job rather than moving the ended
one on; the attempt that ended is kept in the job's history). Re-applying the transition that led to the
current state is a no-op (``same``), so a redelivered event changes nothing; any other pair is refused
with ``IllegalTransition``.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from enum import StrEnum

from pydantic import BaseModel, Field

from schemas.events import FileRef, JobFinished, JobLaunched, JobOutcome
from wm.errors import Conflict


class JobState(StrEnum):
    """Where a job is in its life."""

    created = "created"
    launched = "launched"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"
    timed_out = "timed_out"


class JobTransition(StrEnum):
    """What can happen to a job."""

    launch = "launch"
    start = "start"
    succeed = "succeed"
    fail = "fail"
    cancel = "cancel"
    time_out = "time_out"


TERMINAL = frozenset({JobState.succeeded, JobState.failed, JobState.cancelled, JobState.timed_out})

_S, _T = JobState, JobTransition
_ENDINGS = {_T.succeed: _S.succeeded, _T.fail: _S.failed, _T.cancel: _S.cancelled, _T.time_out: _S.timed_out}
"""How a job its engine has (launched or running) may end."""
TRANSITIONS: dict[tuple[JobState, JobTransition], JobState] = {
    (_S.created, _T.launch): _S.launched,
    (_S.created, _T.fail): _S.failed,  # the launch kept failing
    (_S.created, _T.cancel): _S.cancelled,
    (_S.launched, _T.start): _S.running,
    **{
        (state, transition): end
        for state in (_S.launched, _S.running)
        for transition, end in _ENDINGS.items()
    },
}


class IllegalTransition(Conflict):
    """The job cannot take this transition from its current state."""


def next_state(current: JobState, transition: JobTransition) -> JobState:
    """The state after ``transition``; ``IllegalTransition`` when the pair is not in the table."""
    if TRANSITIONS.get((current, transition)) is None and _led_to(current, transition):
        return current
    try:
        return TRANSITIONS[(current, transition)]
    except KeyError:
        raise IllegalTransition(f"a {current} job cannot {transition}") from None


def _led_to(current: JobState, transition: JobTransition) -> bool:
    """Whether ``transition`` is how a job gets into ``current`` (so repeating it is a no-op)."""
    return any(state is current for (_, t), state in TRANSITIONS.items() if t is transition)


def job_id_for(bucket_id: str) -> str:
    """The job of a bucket: derived, so a duplicate ``bucket.ready`` finds the same job.

    Short and DNS-label safe, because engines use it in names (an Argo workflow name, a container name).
    """
    return "job-" + hashlib.sha256(bucket_id.encode()).hexdigest()[:24]


def export_task_id_for(job_id: str, sink_name: str) -> str:
    """The export task of a job's results for one sink."""
    return f"{job_id}.{sink_name}"


def _now() -> datetime:
    return datetime.now(UTC)


class JobAttempt(BaseModel):
    """An earlier attempt of a job, kept when the job is retried."""

    attempt: int
    engine_job_id: str | None
    state: JobState
    message: str
    started_at: datetime
    finished_at: datetime | None


class Job(BaseModel):
    """A job: one run of one application revision on one bucket (``attempt``: the current run)."""

    job_id: str
    bucket_id: str
    correlation_id: str
    application_id: str
    application_revision: int
    engine: str
    state: JobState = JobState.created
    engine_job_id: str | None = None
    input_prefix: str
    output_prefix: str
    deadline: datetime
    message: str = ""
    outputs: list[FileRef] = Field(default_factory=list)
    cancel_requested: bool = False
    possibly_incomplete: bool = False
    """Its bucket had files of an aborted association that was not retried in time (`BucketReady`)."""
    created_at: datetime = Field(default_factory=_now)
    updated_at: datetime = Field(default_factory=_now)
    finished_at: datetime | None = None
    purged_at: datetime | None = None
    attempt: int = 1
    attempt_started_at: datetime | None = None
    attempts: list[JobAttempt] = Field(default_factory=list, description="earlier attempts, oldest first")

    @property
    def terminal(self) -> bool:
        """Whether the job has ended (succeeded, failed, cancelled or timed out)."""
        return self.state in TERMINAL


_EVENT_FIELDS = {"correlation_id", "job_id", "bucket_id", "application_id", "application_revision", "engine"}
"""What every job event says about its job (with its engine job id)."""


def launched_event(job: Job) -> JobLaunched:
    """The ``job.launched`` of a launched job."""
    assert job.engine_job_id is not None, "a launched job has an engine job id"
    return JobLaunched(
        **job.model_dump(include=_EVENT_FIELDS),
        engine_job_id=job.engine_job_id,
        input_prefix=job.input_prefix,
        output_prefix=job.output_prefix,
        deadline=job.deadline,
    )


def finished_event(job: Job) -> JobFinished:
    """The ``job.finished`` of a job in a terminal state."""
    assert job.terminal, f"job {job.job_id} is {job.state}, not finished"
    status: JobOutcome = job.state.value  # type: ignore[assignment]  # terminal states are the outcomes
    return JobFinished(
        **job.model_dump(include=_EVENT_FIELDS),
        engine_job_id=job.engine_job_id,
        status=status,
        message=job.message,
        outputs=job.outputs,
    )


RETRYABLE = frozenset({JobState.failed, JobState.cancelled, JobState.timed_out})
"""Ended states a job can be run again from (a succeeded job has its result: it is not run twice)."""


def retry_refusal(state: JobState, inputs_purged: bool) -> str | None:
    """Why a job in ``state`` cannot be retried, or None when it can."""
    if state not in RETRYABLE:
        return f"only a failed, cancelled or timed-out job can be retried; this one is {state.value}"
    if inputs_purged:
        return "its inputs were removed by retention (`mwm cleanup`)"
    return None


def engine_job_name(job_id: str, attempt: int) -> str:
    """The name attempt ``attempt`` of a job runs under on its engine.

    The first attempt keeps the job id; a later one gets a suffix, so the engine's launch (idempotent per
    name) starts it afresh instead of finding the attempt that ended.
    """
    return job_id if attempt == 1 else f"{job_id}-a{attempt}"


def launched_message_id(job_id: str, attempt: int) -> str:
    """The message id of an attempt's ``job.launched`` (a consumer drops a message id it has seen)."""
    return f"{job_id}.launched" if attempt == 1 else f"{job_id}.launched.a{attempt}"


def finished_message_id(job_id: str, attempt: int) -> str:
    """The message id of an attempt's ``job.finished``."""
    return f"{job_id}.finished" if attempt == 1 else f"{job_id}.finished.a{attempt}"
