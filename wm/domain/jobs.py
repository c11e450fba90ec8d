"""The job state machine and the ids derived from business keys. Pure: no I/O.

    created --launch--> launched --start--> running --succeed--> succeeded
       |                  |  |                 |  --fail-----> failed
       |                  |  +---(any of succeed/fail/cancel/time_out from launched too)
       +--fail (launch kept failing)--> failed
    cancel: created|launched|running -> cancelled;  time_out: launched|running -> timed_out

Terminal states accept nothing. Re-applying the transition that led to the current state is a no-op
(``same``), so a redelivered event changes nothing; any other pair is refused with ``IllegalTransition``.
"""

from __future__ import annotations

import hashlib
from enum import StrEnum

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
TRANSITIONS: dict[tuple[JobState, JobTransition], JobState] = {
    (_S.created, _T.launch): _S.launched,
    (_S.created, _T.fail): _S.failed,
    (_S.created, _T.cancel): _S.cancelled,
    (_S.launched, _T.start): _S.running,
    (_S.launched, _T.succeed): _S.succeeded,
    (_S.launched, _T.fail): _S.failed,
    (_S.launched, _T.cancel): _S.cancelled,
    (_S.launched, _T.time_out): _S.timed_out,
    (_S.running, _T.succeed): _S.succeeded,
    (_S.running, _T.fail): _S.failed,
    (_S.running, _T.cancel): _S.cancelled,
    (_S.running, _T.time_out): _S.timed_out,
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
