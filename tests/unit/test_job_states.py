"""The job state machine."""

from __future__ import annotations

import pytest

from wm.domain.jobs import TERMINAL, IllegalTransition, JobState, JobTransition, job_id_for, next_state

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
