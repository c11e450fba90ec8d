"""The pure rules behind the Export API: merging progress reports, the final result, the held lease."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from schemas.events import ExportRequested, FileExportResult, FileRef, SinkRef
from wm.domain.exports import NO_RESULT, ExportState, final_result, lane_count, merge_results, task_for

FILES = [FileRef(bucket="mwm-test", key=f"out/{n}.dcm", size=1) for n in range(3)]


def result(n: int, status: str) -> FileExportResult:
    return FileExportResult.model_validate({"key": f"out/{n}.dcm", "status": status})


def test_later_reports_replace_earlier_ones_in_file_order_and_unknown_keys_are_dropped() -> None:
    stray = FileExportResult(key="elsewhere.dcm", status="succeeded")
    merged = merge_results(
        FILES, [result(2, "failed")], [result(0, "succeeded"), result(2, "succeeded"), stray]
    )
    assert merged == [result(0, "succeeded"), result(2, "succeeded")]


def test_the_final_result_covers_every_file_and_computes_the_outcome_unless_given() -> None:
    outcome, results, text = final_result(FILES, [result(0, "succeeded"), result(1, "succeeded")])
    assert outcome == "partial" and [r.status for r in results] == ["succeeded", "succeeded", "failed"]
    assert results[2].error == NO_RESULT and text.startswith("2 succeeded, 1 failed")
    assert final_result(FILES, [], "succeeded")[0] == "succeeded"


def test_a_task_shows_its_lease_only_while_it_is_held() -> None:
    event = ExportRequested(
        correlation_id="c", export_task_id="t", job_id="j", application_id="a",
        sink=SinkRef(name="ig", type="external"), files=FILES,
    )  # fmt: skip
    now = datetime.now(UTC)
    pending = task_for(event, now)
    assert pending.held_lease is None
    held = pending.model_copy(
        update={"state": ExportState.in_progress, "lease_owner": "me", "lease_number": 3,
                "lease_expires_at": now + timedelta(seconds=60)}
    )  # fmt: skip
    assert held.held_lease is not None and (held.held_lease.owner, held.held_lease.number) == ("me", 2)


def test_lanes_need_enough_files_each() -> None:
    assert [lane_count(n, 4, 32) for n in (0, 31, 64, 100, 1000)] == [1, 1, 2, 3, 4]
