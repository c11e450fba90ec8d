"""The MONAI Informatics Gateway's messages: golden bodies per IG version, and their mapping onto MWM."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import pytest
from aio_pika.abc import AbstractIncomingMessage
from pydantic import ValidationError

from devkit.dicom import write_ct_study
from devkit.events import payload_arrived
from devkit.ig_emulator import (
    VERSIONS,
    Version,
    dicom_json,
    export_complete_body,
    newtonsoft_time,
    workflow_request_body,
)
from schemas.applications import ApplicationDefinition, SinkDefinition
from schemas.events import BucketFile, FileExportResult, FileRef, SinkRef
from schemas.monai_ig import (
    DataService,
    ExportCompleteEvent,
    ExportRequestEvent,
    ExportStatus,
    FileExportStatus,
    WorkflowRequestEvent,
)
from tests.unit.ig_fakes import Delivery, golden
from wm.adapters.monai_ig import decode, message_for
from wm.config import Settings
from wm.domain.discovery import Candidate, placements
from wm.domain.exports import ExportTask
from wm.domain.monai_ig import (
    application_names,
    completion_result,
    direct_buckets,
    identifiers_from_dicom_json,
    ig_keys,
    requested_files,
)
from wm.errors import InvalidMessage
from wm.sinks.monai_ig import MonaiIgSink, MonaiIgSinkSettings


@pytest.mark.parametrize("version", VERSIONS)
def test_every_versions_workflow_request_parses_with_its_ae_titles(version: Version) -> None:
    request = WorkflowRequestEvent.model_validate(golden("workflow_request", version))
    assert (request.calling_ae_title, request.called_ae_title) == ("MODALITY", "MONAI-MIP")
    assert request.payload_id == "5d3f9a43-0c2e-4b7e-9d1c-2f0a7a5f3b11"
    assert not request.returns_artifacts
    [first, second] = requested_files(request)
    assert first.key.startswith(f"{request.payload_id}/dcm/1.2.826.0.1.3680043.8.498.1/")
    assert first.metadata_key == first.key + ".json" and second.key.endswith(".4.dcm")
    if version == "0.5":
        assert request.trigger is not None and request.trigger.artifact_type == 10
        assert request.data_origins[0].source == "PACS2"
    if version != "0.3":
        assert request.trigger is not None and request.trigger.data_service is DataService.DIMSE


@pytest.mark.parametrize("version", VERSIONS)
def test_the_emulator_writes_each_version_with_the_golden_fixtures_properties_in_order(
    version: Version,
) -> None:
    reference = golden("workflow_request", version)
    paths = [item["path"] for item in reference["payload"]]
    built = workflow_request_body(
        version,
        payload_id=reference["payload_id"],
        correlation_id=reference["correlation_id"],
        bucket="monaideploy",
        workflows=[],
        calling_ae="MODALITY",
        called_ae="MONAI-MIP",
        paths=paths,
        timestamp=datetime(2024, 1, 1, tzinfo=UTC),
    )
    assert list(built) == list(reference)
    if "trigger" in reference:
        assert list(built["trigger"]) == list(reference["trigger"])
    completion = export_complete_body(version, golden("export_request", version), "Success", "", {})
    assert list(completion) == list(golden("export_complete", version))


def test_newtonsoft_times_drop_trailing_zeros() -> None:
    assert newtonsoft_time(datetime(2023, 5, 3, 12, 47, 59, 46000, tzinfo=UTC)) == "2023-05-03T12:47:59.046Z"
    assert newtonsoft_time(datetime(2023, 5, 3, 12, 47, 59, tzinfo=UTC)) == "2023-05-03T12:47:59Z"


def test_property_names_match_in_any_case_and_enums_by_name() -> None:
    body = golden("workflow_request", "0.4")
    body["Trigger"] = {"DataService": "DicomWeb", "Source": "host.example", "Destination": "10.0.0.1"}
    del body["trigger"]
    request = WorkflowRequestEvent.model_validate(body)
    assert request.trigger is not None and request.trigger.data_service is DataService.DicomWeb


def test_a_request_with_neither_trigger_nor_calling_ae_title_is_invalid() -> None:
    body = golden("workflow_request", "0.4")
    del body["trigger"]
    with pytest.raises(ValidationError, match="neither trigger"):
        WorkflowRequestEvent.model_validate(body)


def test_returned_artifacts_are_recognised() -> None:
    body = golden("workflow_request", "0.5") | {"workflow_instance_id": "wf-1", "task_id": "task-1"}
    assert WorkflowRequestEvent.model_validate(body).returns_artifacts


@pytest.mark.parametrize("version", VERSIONS)
def test_every_versions_export_request_parses(version: Version) -> None:
    request = ExportRequestEvent.model_validate(golden("export_request", version))
    assert request.files == ["mwm-exports/job-1.pacs/mwm/jobs/job-1/output/mip.dcm"]
    assert request.destinations == ["PACS"] and request.export_task_id == "job-1.pacs"


SENT = {
    "mwm-exports/job-1.pacs/mwm/jobs/job-1/output/mip.dcm": "jobs/job-1/output/mip.dcm",
    "mwm-exports/job-1.pacs/mwm/jobs/job-1/output/a.dcm": "jobs/job-1/output/a.dcm",
    "mwm-exports/job-1.pacs/mwm/jobs/job-1/output/b.dcm": "jobs/job-1/output/b.dcm",
}


def test_a_successful_completion_succeeds_every_file() -> None:
    completion = ExportCompleteEvent.model_validate(golden("export_complete", "0.3"))
    sent = {key: value for key, value in SENT.items() if key.endswith("mip.dcm")}
    outcome, results, _ = completion_result(completion, sent)
    assert outcome == "succeeded"
    assert results == [FileExportResult(key="jobs/job-1/output/mip.dcm", status="succeeded")]


def test_a_partial_failure_records_each_files_status() -> None:
    completion = ExportCompleteEvent.model_validate(golden("export_complete", "0.4"))
    sent = {key: value for key, value in SENT.items() if not key.endswith("mip.dcm")}
    skipped = [FileExportResult(key="jobs/job-1/output/report.txt", status="skipped")]
    outcome, results, message = completion_result(completion, sent, skipped)
    assert outcome == "partial" and "C-STORE failed" in message
    by_key = {result.key: result for result in results}
    assert by_key["jobs/job-1/output/a.dcm"].status == "succeeded"
    assert by_key["jobs/job-1/output/b.dcm"].status == "failed"
    assert "ServiceError" in (by_key["jobs/job-1/output/b.dcm"].error or "")
    assert by_key["jobs/job-1/output/report.txt"].status == "skipped"


def test_a_failure_with_status_names_and_the_05_target_fails_every_file() -> None:
    body = golden("export_complete", "0.5")
    body["file_statuses"] = {key: "ConfigurationError" for key in body["file_statuses"]}
    completion = ExportCompleteEvent.model_validate(body)
    assert completion.file_statuses == {
        next(iter(body["file_statuses"])): FileExportStatus.ConfigurationError
    }
    outcome, [result], _ = completion_result(
        completion, {k: v for k, v in SENT.items() if k.endswith("mip.dcm")}
    )
    assert outcome == "failed" and "ConfigurationError" in (result.error or "")


def test_statuses_come_as_integers_or_names_and_unknown_ones_are_invalid() -> None:
    base = golden("export_complete", "0.4")
    assert ExportCompleteEvent.model_validate(base | {"status": 2}).status is ExportStatus.PartialFailure
    assert (
        ExportCompleteEvent.model_validate(base | {"status": "partialfailure"}).status
        is ExportStatus.PartialFailure
    )
    with pytest.raises(ValidationError, match="Success, Failure"):
        ExportCompleteEvent.model_validate(base | {"status": "Done"})


def test_a_completion_without_file_statuses_as_from_ig_030_uses_the_overall_status() -> None:
    body = {k: v for k, v in golden("export_complete", "0.3").items() if k != "file_statuses"}
    sent = {k: v for k, v in SENT.items() if not k.endswith("mip.dcm")}
    outcome, results, _ = completion_result(ExportCompleteEvent.model_validate(body), sent)
    assert outcome == "succeeded" and {r.status for r in results} == {"succeeded"}
    failed = ExportCompleteEvent.model_validate(body | {"status": "Failure", "message": "down"})
    outcome, results, message = completion_result(failed, sent)
    assert outcome == "failed" and message == "down"
    assert all("no file status from the IG" in (r.error or "") for r in results)


def test_unknown_status_is_decided_by_the_files() -> None:
    body = golden("export_complete", "0.4") | {"status": "Unknown"}
    sent = {k: v for k, v in SENT.items() if not k.endswith("mip.dcm")}
    assert completion_result(ExportCompleteEvent.model_validate(body), sent)[0] == "partial"


def test_identifiers_come_from_the_dicom_json_the_ig_writes(tmp_path: Path) -> None:
    study = write_ct_study(tmp_path, slices_per_series=1)
    document = dicom_json(study.files[0])
    ids = identifiers_from_dicom_json(document)
    assert ids is not None and ids.study_instance_uid == study.study_uid and ids.modality == "CT"
    del document["00080018"]
    assert identifiers_from_dicom_json(document) is None
    assert identifiers_from_dicom_json([]) is None


def test_workflows_name_applications_only_when_they_can() -> None:
    assert application_names(["mip", "3f1c5a0e-8f2d-4b44-bb0f-9a7e2c1d0e55", "Liver Seg", "mip"]) == [
        "3f1c5a0e-8f2d-4b44-bb0f-9a7e2c1d0e55",
        "mip",
    ]


def test_each_matched_application_gets_one_bucket_of_the_whole_payload() -> None:
    definition = ApplicationDefinition.model_validate(
        {"name": "mip", "version": "1", "map": {"command": ["true"]}}
    )
    other = definition.model_copy(update={"name": "seg"})
    candidates = [Candidate("mip", 2, definition), Candidate("seg", 1, other)]
    placed = []
    for study in ("1.1", "1.2"):
        event = payload_arrived(study_uid=study, key=f"p/{study}.dcm")
        accepted, _ = placements(candidates, event)
        placed += [(p, BucketFile(file=event.file, dicom=event.dicom)) for p in accepted]
    now = datetime.now(UTC)
    buckets = direct_buckets("payload-1", "corr-1", placed, now)
    assert sorted(b.application_id for b in buckets) == ["mip", "seg"]
    assert all(len(b.files) == 2 and b.grouping_value == "1.1\\1.2" for b in buckets)
    assert direct_buckets("payload-1", "corr-1", placed, now)[0].bucket_id == buckets[0].bucket_id


def test_the_sink_hands_off_deduplicated_keys_in_the_igs_bucket() -> None:
    settings = Settings()
    definition = SinkDefinition.model_validate(
        {
            "name": "pacs",
            "type": "monai-ig",
            "args": {"destinations": ["PACS"], "plug_in_assemblies": ["P, A"]},
        }
    )
    now = datetime.now(UTC)
    files = [
        FileRef(bucket="mwm", key="jobs/j/output/a.dcm", size=1),
        FileRef(bucket="mwm", key="jobs/j/output/a.dcm", size=1),
        FileRef(bucket="monaideploy", key="p/dcm/b.dcm", size=1),
        FileRef(bucket="mwm", key="jobs/j/output/report.txt", size=1),
    ]
    task = ExportTask(
        export_task_id="j.pacs",
        job_id="j",
        application_id="mip",
        correlation_id="c",
        sink=SinkRef(name="pacs", type="monai-ig"),
        files=files,
        created_at=now,
        updated_at=now,
    )
    hand_off = MonaiIgSink(definition, MonaiIgSinkSettings.of(settings)).hand_off(task)
    assert hand_off.routing_key == "md.export.request.monaiscu"
    assert hand_off.request is not None
    assert hand_off.request.files == ["mwm-exports/j.pacs/mwm/jobs/j/output/a.dcm", "p/dcm/b.dcm"]
    assert [r.key for r in hand_off.skipped] == ["jobs/j/output/report.txt"]
    body = json.loads(message_for(hand_off.request, "c", "app").body)
    assert list(body)[:5] == [
        "workflow_instance_id",
        "export_task_id",
        "files",
        "destinations",
        "correlation_id",
    ]
    assert (
        body["plug_in_assemblies"] == ["P, A"]
        and body["Target"] is None
        and body["workflow_instance_id"] == "j"
    )
    assert ig_keys("t", files[:1], "mwm") == {"jobs/j/output/a.dcm": files[0]}


def test_a_monai_ig_sink_needs_its_args() -> None:
    with pytest.raises(ValidationError, match="monai-ig sink needs args"):
        SinkDefinition.model_validate({"name": "pacs", "type": "monai-ig"})


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"correlation_id": None}, "missing AMQP property correlation_id"),
        ({"app_id": " "}, "missing AMQP property app_id"),
        ({"type": "TaskUpdateEvent"}, "is not ExportCompleteEvent"),
        ({"body": b"{not json"}, "ExportCompleteEvent failed validation"),
        ({"body": b'{"export_task_id": "t"}'}, "workflow_instance_id: Field required"),
    ],
)
def test_a_delivery_the_ig_library_would_reject_is_invalid(changes: dict[str, Any], reason: str) -> None:
    body = json.dumps(golden("export_complete", "0.4")).encode()
    delivery = Delivery(body)
    for key, value in changes.items():
        setattr(delivery, key, value)
    with pytest.raises(InvalidMessage, match=reason):
        decode(cast(AbstractIncomingMessage, delivery), ExportCompleteEvent)
    assert (
        decode(cast(AbstractIncomingMessage, Delivery(body)), ExportCompleteEvent).export_task_id
        == "job-1.pacs"
    )


def test_the_ig_messages_have_their_own_channels_and_schemas() -> None:
    from schemas.generate import SCHEMA_DIR, asyncapi

    document = asyncapi()
    addresses = {channel["address"]: name for name, channel in document["channels"].items()}
    for address in ("md.workflow.request", "md.export.request.{agent}", "md.export.complete"):
        channel = document["channels"][addresses[address]]
        assert channel["bindings"]["amqp"]["exchange"]["name"] == "monaideploy"
    assert document["operations"]["sendIgExportRequestEvent"]["action"] == "send"
    schema = json.loads((SCHEMA_DIR / "monai-ig.ExportRequestEvent.json").read_text())
    assert "Target" in schema["properties"] and set(schema["required"]) >= {"files", "destinations"}
