"""Tables for people keep one row per item."""

from __future__ import annotations

import pytest

from wm.cli.output import OutputFormat, emit


def test_a_multi_line_value_stays_on_its_row(capsys: pytest.CaptureFixture[str]) -> None:
    rows: list[dict[str, str | None]] = [
        {
            "job_id": "j-1",
            "state": "failed",
            "message": "exit code 2\nTraceback (most recent call last):\n  boom",
        },
        {"job_id": "j-2", "state": "succeeded", "message": None},
    ]

    emit(rows, ["job_id", "state", "message"], OutputFormat.table)

    header, first, second = capsys.readouterr().out.splitlines()
    assert header.split() == ["JOB_ID", "STATE", "MESSAGE"]
    assert first.split(maxsplit=2) == [
        "j-1",
        "failed",
        "exit code 2 / Traceback (most recent call last): / boom",
    ]
    assert second.split() == ["j-2", "succeeded", "-"]
