"""The pure export rules: outcome from per-file results, extension filtering, result completion, splitting."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from schemas.events import ExportRequested, FileExportResult, FileRef, SinkRef
from wm.domain.exports import (
    NO_RESULT,
    ExportState,
    complete_results,
    completed_event,
    completed_message_id,
    export_outcome,
    split_by_extension,
    split_evenly,
    summary,
    task_for,
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
