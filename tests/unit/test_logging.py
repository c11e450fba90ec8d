"""Log output: one JSON object per line off a terminal, with the delivery's bound context."""

from __future__ import annotations

import json
import logging
import sys
import threading
from collections.abc import Iterator

import pytest
import structlog

from wm.logging import configure_logging


@pytest.fixture
def stderr(capsys: pytest.CaptureFixture[str]) -> Iterator[pytest.CaptureFixture[str]]:
    """The test's stderr (captured: not a terminal); logging is reset afterwards."""
    hooks = (sys.excepthook, threading.excepthook)
    yield capsys
    structlog.reset_defaults()
    structlog.contextvars.clear_contextvars()
    for handler in logging.getLogger().handlers[:]:
        logging.getLogger().removeHandler(handler)  # it writes to this test's captured stderr
    sys.excepthook, threading.excepthook = hooks


def test_auto_format_writes_json_lines_with_the_bound_context_when_stderr_is_not_a_terminal(
    stderr: pytest.CaptureFixture[str],
) -> None:
    configure_logging("auto", "INFO")
    structlog.contextvars.bind_contextvars(correlation_id="c-1", consumer="scheduler")

    structlog.get_logger("test").info("delivery_handled", outcome="succeeded", duration_ms=1.5)
    structlog.get_logger("test").debug("not_shown")

    [line] = stderr.readouterr().err.splitlines()
    record = json.loads(line)
    assert record["event"] == "delivery_handled"
    assert record["level"] == "info"
    assert record["correlation_id"] == "c-1" and record["consumer"] == "scheduler"
    assert record["duration_ms"] == 1.5
    assert record["timestamp"].endswith("Z")


def test_values_json_cannot_represent_are_logged_by_their_repr(stderr: pytest.CaptureFixture[str]) -> None:
    configure_logging("json", "INFO")

    structlog.get_logger("test").info("odd_value", value={1, 2}.__class__)

    assert json.loads(stderr.readouterr().err)["value"] == repr(set)


def test_console_format_is_for_people(stderr: pytest.CaptureFixture[str]) -> None:
    configure_logging("console", "INFO")

    structlog.get_logger("test").info("delivery_handled", outcome="succeeded")

    line = stderr.readouterr().err
    assert "delivery_handled" in line and "outcome=succeeded" in line
    with pytest.raises(json.JSONDecodeError):
        json.loads(line)


def test_standard_library_records_and_their_tracebacks_are_one_json_line_each(
    stderr: pytest.CaptureFixture[str],
) -> None:
    configure_logging("json", "INFO")
    try:
        raise ConnectionResetError("the broker went away")
    except ConnectionResetError:
        logging.getLogger("aiormq.connection").exception("Unexpected connection close")
    logging.getLogger("uvicorn.error").info("Started server process [%d]", 42)

    first, second = (json.loads(line) for line in stderr.readouterr().err.splitlines())
    assert (first["logger"], first["level"], first["event"]) == (
        "aiormq.connection",
        "error",
        "Unexpected connection close",
    )
    assert first["exception"].startswith("Traceback") and "the broker went away" in first["exception"]
    assert (second["logger"], second["event"]) == ("uvicorn.error", "Started server process [42]")


def test_an_uncaught_exception_in_a_thread_is_one_json_line(stderr: pytest.CaptureFixture[str]) -> None:
    configure_logging("json", "INFO")
    worker = threading.Thread(target=lambda: 1 / 0, name="association-1")
    worker.start()
    worker.join()

    [line] = stderr.readouterr().err.splitlines()
    record = json.loads(line)
    assert (record["event"], record["thread"]) == ("uncaught_exception_in_thread", "association-1")
    assert "ZeroDivisionError" in record["exception"]
