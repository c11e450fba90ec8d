"""What retention may remove of an IG task: decided by the task alone (``wm.domain.monai_ig``)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from schemas.events import FileRef
from wm.domain.exports import ExportState, ExportTask
from wm.domain.monai_ig import copied_for, ig_keys, past_retention

pytestmark = pytest.mark.unit

CUTOFF = datetime(2026, 1, 8, tzinfo=UTC)


def task(state: ExportState, completed_at: datetime | None) -> ExportTask:
    return ExportTask.model_validate(
        {
            "export_task_id": "job-1.ig-pacs",
            "job_id": "job-1",
            "correlation_id": "c",
            "application_id": "mip",
            "sink": {"name": "ig-pacs", "type": "monai-ig"},
            "files": [],
            "state": state,
            "created_at": CUTOFF - timedelta(days=30),
            "updated_at": CUTOFF - timedelta(days=30),
            "completed_at": completed_at,
        }
    )


@pytest.mark.parametrize("state", [ExportState.succeeded, ExportState.partial, ExportState.failed])
def test_a_final_task_completed_before_the_cutoff_may_go_and_one_completed_after_stays(
    state: ExportState,
) -> None:
    assert past_retention(task(state, CUTOFF - timedelta(seconds=1)), CUTOFF)
    assert not past_retention(task(state, CUTOFF), CUTOFF)


@pytest.mark.parametrize("state", [ExportState.pending, ExportState.in_progress])
def test_an_unfinished_task_stays_whatever_its_age(state: ExportState) -> None:
    assert not past_retention(task(state, None), CUTOFF)
    assert not past_retention(task(state, CUTOFF - timedelta(days=300)), CUTOFF)


def test_a_purged_task_leaves_nothing_to_keep() -> None:
    assert past_retention(None, CUTOFF)


def test_every_copy_the_sink_places_names_its_task_and_other_keys_none() -> None:
    files = [
        FileRef(bucket="mwm", key="jobs/job-1/output/a.dcm", size=1),
        FileRef(bucket="igb", key="p/dcm/b.dcm", size=1),
    ]
    keys = ig_keys("job-1.ig-pacs", files, "igb")
    assert [copied_for(key) for key in keys] == ["job-1.ig-pacs", None]
    assert copied_for("mwm-exports/") is None and copied_for("mwm-exports/job-1.ig-pacs") is None
