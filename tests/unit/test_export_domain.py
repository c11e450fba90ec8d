"""The pure export rules: outcome from per-file results, extension filtering, result completion, splitting."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from schemas.events import ExportRequested, FileExportResult, FileRef, SinkRef
from wm.domain.exports import (
    NO_RESULT,
    ExportState,
    RedeliveryPolicy,
    complete_results,
    completed_event,
    completed_message_id,
    export_outcome,
    kept_results,
    split_by_extension,
    split_evenly,
    summary,
    task_for,
    unsent,
    wanted_by,
)


def ref(key: str) -> FileRef:
    return FileRef(bucket="mwm-test", key=key, size=1)


def result(key: str, status: str) -> FileExportResult:
    return FileExportResult.model_validate({"key": key, "status": status})


@pytest.mark.parametrize(
    ("statuses", "outcome"),
    [
        (["succeeded", "succeeded"], "succeeded"),
        (["succeeded", "skipped"], "succeeded"),
        (["skipped", "skipped"], "succeeded"),
        ([], "succeeded"),
        (["succeeded", "failed"], "partial"),
        (["succeeded", "failed", "skipped"], "partial"),
        (["failed", "failed"], "failed"),
        (["failed", "skipped"], "failed"),
    ],
)
def test_outcome_follows_the_per_file_results(statuses: list[str], outcome: str) -> None:
    assert export_outcome(result(f"f{i}", s) for i, s in enumerate(statuses)) == outcome


@pytest.mark.parametrize(
    ("extensions", "key", "wanted"),
    [
        ([".dcm"], "out/a.dcm", True),
        ([".dcm"], "out/A.DCM", True),
        (["dcm"], "out/a.dcm", True),
        ([".dcm"], "out/report.pdf", False),
        ([".dcm"], "out.dcm/report", False),
        ([], "out/report.pdf", True),
        ([".dcm", ".json"], "out/x.json", True),
    ],
)
def test_extension_filter(extensions: list[str], key: str, wanted: bool) -> None:
    assert wanted_by(extensions, key) is wanted


def test_split_by_extension_skips_the_rest_with_a_reason() -> None:
    wanted, skipped = split_by_extension([ref("a.dcm"), ref("b.txt")], [".dcm"])
    assert [f.key for f in wanted] == ["a.dcm"]
    assert [(r.key, r.status) for r in skipped] == [("b.txt", "skipped")]
    assert skipped[0].error and ".dcm" in skipped[0].error


def test_every_file_gets_exactly_one_result_in_order() -> None:
    files = [ref("a.dcm"), ref("b.dcm"), ref("c.dcm")]
    results = complete_results(
        files,
        [
            result("c.dcm", "succeeded"),
            result("zzz", "succeeded"),
            result("a.dcm", "failed"),
            result("a.dcm", "succeeded"),
        ],
    )
    assert [(r.key, r.status) for r in results] == [
        ("a.dcm", "succeeded"),
        ("b.dcm", "failed"),
        ("c.dcm", "succeeded"),
    ]
    assert results[1].error == NO_RESULT


@pytest.mark.parametrize(
    ("count", "lanes", "minimum", "sizes"),
    [
        (10, 2, 32, [10]),
        (64, 2, 32, [32, 32]),
        (65, 2, 32, [33, 32]),
        (324, 4, 32, [81, 81, 81, 81]),
        (1, 3, 1, [1]),
        (5, 3, 1, [2, 2, 1]),
        (0, 2, 1, []),
    ],
)
def test_split_evenly_keeps_runs_contiguous_and_big_enough(
    count: int, lanes: int, minimum: int, sizes: list[int]
) -> None:
    runs = split_evenly(list(range(count)), lanes, minimum)
    assert [len(run) for run in runs] == sizes
    assert [item for run in runs for item in run] == list(range(count))


def test_a_task_from_its_request_and_its_completion_event() -> None:
    sink = SinkRef(name="pacs", type="dicom")
    event = ExportRequested(
        correlation_id="c1",
        export_task_id="job-1.pacs",
        job_id="job-1",
        application_id="app",
        sink=sink,
        files=[ref("a.dcm")],
    )
    task = task_for(event, datetime.now(UTC))
    assert task.state is ExportState.pending and not task.is_final
    with pytest.raises(ValueError, match="not final"):
        completed_event(task)
    done = task.model_copy(update={"state": ExportState.partial, "file_results": [result("a.dcm", "failed")]})
    completed = completed_event(done)
    assert (completed.status, completed.export_task_id) == ("partial", "job-1.pacs")
    assert completed_message_id("job-1.pacs") == "job-1.pacs.completed"


def test_summary_counts_and_quotes_the_first_error() -> None:
    results = [
        result("a", "succeeded"),
        FileExportResult(key="b", status="failed", error="boom"),
        result("c", "skipped"),
    ]
    assert summary(results) == "1 succeeded, 1 failed, 1 skipped (first error: boom)"


def test_a_retry_sends_only_the_files_without_a_success_and_keeps_the_rest() -> None:
    files = [ref("a.dcm"), ref("b.dcm"), ref("c.dcm"), ref("d.txt")]
    results = [result("a.dcm", "succeeded"), result("b.dcm", "failed"), result("d.txt", "skipped")]
    assert [file.key for file in unsent(files, results)] == ["b.dcm", "c.dcm"]
    assert [r.key for r in kept_results(results)] == ["a.dcm", "d.txt"]


def test_redeliveries_back_off_exponentially_with_jitter_and_stop_at_the_end_of_the_window() -> None:
    policy = RedeliveryPolicy(window_s=3600, initial_s=5, max_s=300)
    for retries, base in [(0, 5), (1, 10), (2, 20), (5, 160), (6, 300), (20, 300)]:
        delays = {policy.delay_s(retries) for _ in range(20)}
        assert all(base <= delay <= min(base + 5, 300) for delay in delays), (retries, delays)
        assert base == 300 or len(delays) > 1, "jittered"
    since = datetime(2026, 1, 1, tzinfo=UTC)
    assert policy.next_at(since, 3, since + timedelta(minutes=30)) is not None
    last = since + timedelta(minutes=59, seconds=55)
    assert policy.next_at(since, 3, last) == since + timedelta(hours=1), "the last try at the window's end"
    assert policy.next_at(since, 4, since + timedelta(hours=1)) is None, "past the window"


def test_a_task_is_claimable_when_pending_or_its_lease_ran_out() -> None:
    now = datetime.now(UTC)
    event = ExportRequested(
        correlation_id="c1",
        export_task_id="job-1.pacs",
        job_id="job-1",
        application_id="app",
        sink=SinkRef(name="pacs", type="dicom"),
        files=[ref("a.dcm")],
    )
    pending = task_for(event, now)
    held = pending.model_copy(
        update={
            "state": ExportState.in_progress,
            "lease_owner": "x",
            "lease_expires_at": now + timedelta(seconds=5),
        }
    )
    lapsed = held.model_copy(update={"lease_expires_at": now - timedelta(seconds=1)})
    final = lapsed.model_copy(update={"state": ExportState.succeeded})
    assert pending.claimable(now) and not pending.lease_expired(now)
    assert not held.claimable(now) and not held.lease_expired(now)
    assert lapsed.claimable(now) and lapsed.lease_expired(now)
    assert not final.claimable(now) and not final.lease_expired(now)
