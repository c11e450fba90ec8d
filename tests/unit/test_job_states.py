"""The job state machine."""

from __future__ import annotations

import pytest

from wm.domain.jobs import (
    TERMINAL,
    IllegalTransition,
    JobState,
    JobTransition,
    engine_job_name,
    finished_message_id,
    job_id_for,
    launched_message_id,
    next_state,
    retry_refusal,
)

S, T = JobState, JobTransition


@pytest.mark.parametrize(
    ("state", "transition", "expected"),
    [
        (S.created, T.launch, S.launched),
        (S.launched, T.start, S.running),
        (S.running, T.succeed, S.succeeded),
        (S.running, T.fail, S.failed),
        (S.launched, T.time_out, S.timed_out),
        (S.running, T.cancel, S.cancelled),
        (S.created, T.fail, S.failed),
    ],
)
def test_legal_transitions(state: JobState, transition: JobTransition, expected: JobState) -> None:
    assert next_state(state, transition) is expected


@pytest.mark.parametrize("state", sorted(TERMINAL))
@pytest.mark.parametrize("transition", [T.launch, T.start])
def test_a_terminal_job_refuses_new_transitions(state: JobState, transition: JobTransition) -> None:
    with pytest.raises(IllegalTransition):
        next_state(state, transition)


@pytest.mark.parametrize("state", [S.succeeded, S.failed, S.timed_out])
def test_a_finished_job_cannot_be_cancelled(state: JobState) -> None:
    with pytest.raises(IllegalTransition):
        next_state(state, T.cancel)


@pytest.mark.parametrize(
    ("state", "transition"),
    [(S.created, T.start), (S.created, T.succeed), (S.succeeded, T.fail), (S.failed, T.succeed)],
)
def test_illegal_pairs_are_refused(state: JobState, transition: JobTransition) -> None:
    with pytest.raises(IllegalTransition, match=f"a {state} job cannot {transition}"):
        next_state(state, transition)


@pytest.mark.parametrize(
    ("state", "transition"), [(S.launched, T.launch), (S.succeeded, T.succeed), (S.timed_out, T.time_out)]
)
def test_repeating_the_transition_that_led_here_is_a_no_op(
    state: JobState, transition: JobTransition
) -> None:
    assert next_state(state, transition) is state


def test_a_job_id_is_derived_from_its_bucket_and_safe_as_a_kubernetes_name() -> None:
    first, again, other = (
        job_id_for("app.r1.abc.g1"),
        job_id_for("app.r1.abc.g1"),
        job_id_for("app.r1.abc.g2"),
    )
    assert first == again != other
    assert len(first) <= 63 and first.replace("-", "").isalnum() and first == first.lower()


def test_only_a_failed_cancelled_or_timed_out_job_with_its_inputs_can_be_retried() -> None:
    retryable = [state for state in JobState if retry_refusal(state, inputs_purged=False) is None]
    assert sorted(retryable) == sorted([JobState.failed, JobState.cancelled, JobState.timed_out])
    assert "succeeded" in (retry_refusal(JobState.succeeded, inputs_purged=False) or "")
    assert "retention" in (retry_refusal(JobState.failed, inputs_purged=True) or "")


def test_a_later_attempt_runs_and_is_announced_under_names_of_its_own() -> None:
    assert engine_job_name("job-1", 1) == "job-1", "the first attempt keeps the name jobs always had"
    assert engine_job_name("job-1", 2) == "job-1-a2"
    assert finished_message_id("job-1", 1) == "job-1.finished"
    assert len({finished_message_id("job-1", n) for n in (1, 2, 3)}) == 3
    assert len({launched_message_id("job-1", n) for n in (1, 2, 3)}) == 3
