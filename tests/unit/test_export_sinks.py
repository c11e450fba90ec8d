"""The export sink base class (filtering, one result per file) and finding sinks by type."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from schemas.applications import SinkDefinition
from schemas.events import FileExportResult, FileRef
from tests.unit.fakes import NoFiles
from wm.config import Settings
from wm.plugins import PluginSettings
from wm.sinks import ExportSink, UnknownSinkType, load_sink, sink_class
from wm.sinks.dicom import DicomSink


class Recording(ExportSink[PluginSettings]):
    """Reports the first file it is given as succeeded and forgets the rest."""

    sent: list[str]

    async def _send(self, files: Sequence[FileRef]) -> list[FileExportResult]:
        self.sent = [file.key for file in files]
        return [FileExportResult(key=files[0].key, status="succeeded")]


def definition(**changes: object) -> SinkDefinition:
    base = {"name": "pacs", "type": "dicom", "args": {"ae_title": "PACS", "host": "127.0.0.1", "port": 104}}
    return SinkDefinition.model_validate({**base, **changes})


def ref(key: str) -> FileRef:
    return FileRef(bucket="mwm-test", key=key, size=1)


async def test_export_filters_sends_the_rest_and_reports_every_file() -> None:
    sink = Recording(definition(extensions=[".dcm"]), PluginSettings(), NoFiles())
    outcome, results, message = await sink.export([ref("a.dcm"), ref("notes.txt"), ref("b.dcm")])
    assert sink.sent == ["a.dcm", "b.dcm"]
    assert [(r.key, r.status) for r in results] == [
        ("a.dcm", "succeeded"),
        ("notes.txt", "skipped"),
        ("b.dcm", "failed"),
    ]
    assert results[2].error is not None and "no result" in results[2].error
    assert outcome == "partial" and message.startswith("1 succeeded, 1 failed, 1 skipped")


async def test_nothing_wanted_means_nothing_sent() -> None:
    sink = Recording(definition(extensions=[".dcm"]), PluginSettings(), NoFiles())
    outcome, results, _ = await sink.export([ref("notes.txt")])
    assert not hasattr(sink, "sent")
    assert [r.status for r in results] == ["skipped"]
    assert outcome == "succeeded"


def test_the_dicom_sink_is_built_in(settings: Settings) -> None:
    assert sink_class("dicom") is DicomSink
    sink = load_sink(definition(), settings, NoFiles())
    assert isinstance(sink, DicomSink) and sink.destination == "PACS@127.0.0.1:104"


def test_an_unknown_sink_type_is_a_permanent_error() -> None:
    with pytest.raises(UnknownSinkType, match="external"):
        sink_class("external")
