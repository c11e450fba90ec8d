"""The bus contract: event models, their generated JSON Schema and AsyncAPI files."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from devkit.events import payload_arrived
from schemas.events import EVENT_TYPES, EVENTS_BY_TYPE_NAME, ExportRequested, FileRef, PayloadArrived, SinkRef
from schemas.generate import rendered_files


def test_the_committed_schema_files_match_the_models() -> None:
    drifted = [
        path.name
        for path, content in rendered_files().items()
        if not path.exists() or path.read_text() != content
    ]
    assert drifted == [], f"regenerate with `python -m schemas.generate`: {drifted}"


def test_every_event_has_a_versioned_type_name_and_a_schema_naming_its_required_fields() -> None:
    assert len(EVENTS_BY_TYPE_NAME) == len(EVENT_TYPES) == 6
    for event in EVENT_TYPES:
        assert event.type_name().endswith(".v1")
        assert "correlation_id" in event.model_json_schema()["required"]


def test_export_requested_routes_by_sink_type() -> None:
    event = ExportRequested(
        correlation_id="c1",
        export_task_id="t1",
        job_id="j1",
        application_id="app",
        sink=SinkRef(name="pacs", type="dicom"),
        files=[FileRef(bucket="mwm", key="a.dcm", size=1)],
    )
    assert event.routing_key() == "mwm.export.requested.dicom"


def test_an_event_round_trips_through_json() -> None:
    event = payload_arrived()
    assert PayloadArrived.model_validate_json(event.model_dump_json()) == event


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"called_ae_title": "A" * 17}, "called_ae_title"),
        ({"dicom": {"study_instance_uid": "not-a-uid"}}, "study_instance_uid"),
        ({"file": {"size": -1}}, "size"),
        ({"correlation_id": ""}, "correlation_id"),
    ],
)
def test_invalid_events_are_refused_naming_the_field(change: dict[str, object], field: str) -> None:
    body = json.loads(payload_arrived().model_dump_json())
    for key, value in change.items():
        if isinstance(value, dict):
            body[key].update(value)
        else:
            body[key] = value
    with pytest.raises(ValidationError) as refused:
        PayloadArrived.model_validate(body)
    assert field in str(refused.value)


def test_unknown_fields_are_ignored_so_producers_can_add_optional_fields() -> None:
    sent = payload_arrived()
    body = json.loads(sent.model_dump_json())
    body["added_in_a_later_minor_version"] = True
    received = PayloadArrived.model_validate(body)
    assert received == sent
    assert "added_in_a_later_minor_version" not in received.model_dump()
