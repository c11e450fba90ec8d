"""The events a job announces carry everything the next consumer needs about it."""

from __future__ import annotations

import pytest

from tests.unit.builders import job, ref
from wm.domain.jobs import JobState, finished_event, launched_event


def test_job_launched_says_where_the_job_reads_and_writes_and_until_when() -> None:
    launched = job(JobState.launched)

    event = launched_event(launched)

    assert (event.job_id, event.bucket_id, event.correlation_id) == ("job-1", "seg.r1.abc.g0", "corr-1")
    assert (event.application_id, event.application_revision, event.engine) == ("seg", 1, "local")
    assert event.engine_job_id == "engine-job-1"
    assert (event.input_prefix, event.output_prefix) == ("jobs/job-1/input/", "jobs/job-1/output/")
    assert event.deadline == launched.deadline


def test_job_finished_carries_the_outcome_message_and_outputs() -> None:
    outputs = [ref("jobs/job-1/output/result.dcm")]
    ended = job(JobState.succeeded, message="done", outputs=outputs)

    event = finished_event(ended)

    assert (event.job_id, event.bucket_id, event.engine, event.engine_job_id) == (
        "job-1",
        "seg.r1.abc.g0",
        "local",
        "engine-job-1",
    )
    assert (event.status, event.message, event.outputs) == ("succeeded", "done", outputs)


def test_a_job_that_has_not_ended_has_no_finished_event() -> None:
    with pytest.raises(AssertionError, match="not finished"):
        finished_event(job(JobState.running))
