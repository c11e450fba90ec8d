"""A MONAI Informatics Gateway (IG) in front of MWM, pure: its messages mapped onto MWM's inputs and results.

Inbound, a ``WorkflowRequestEvent`` names files ``{payload_id}/{path}`` in the IG's bucket, each with a
``.dcm.json`` (the DICOM JSON model) MWM reads its identifiers from (`identifiers_from_dicom_json`). A
request is a complete payload: by default each matched application gets one bucket of the payload's
files at once (`direct_buckets`), with no second quiet period.

Outbound, an export task's files become de-duplicated keys in the IG's bucket (`ig_keys`); the IG's
``ExportCompleteEvent`` maps back to a result per file and an outcome (`completion_result`):

| IG ``status`` | MWM outcome | files without a ``file_statuses`` entry |
| --- | --- | --- |
| Success | succeeded | succeeded |
| PartialFailure | partial | failed |
| Failure | failed | failed |
| Unknown | from the files' results | failed |

A file status other than ``Success`` (0) is a failure whose error names the status and carries the IG's
message.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from schemas.events import BucketFile, BucketReady, DicomIdentifiers, ExportOutcome, FileExportResult, FileRef
from schemas.monai_ig import ExportCompleteEvent, ExportStatus, FileExportStatus, WorkflowRequestEvent
from wm.domain.discovery import Placement
from wm.domain.exports import ExportTask, export_outcome, summary

DICOM_JSON_TAGS: dict[str, str] = {
    "0020000D": "study_instance_uid",
    "0020000E": "series_instance_uid",
    "00080018": "sop_instance_uid",
    "00080016": "sop_class_uid",
    "00080060": "modality",
    "00100020": "patient_id",
    "00080050": "accession_number",
}
"""DICOM JSON tag -> ``DicomIdentifiers`` field."""

_APPLICATION_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
IG_EXPORTS_PREFIX = "mwm-exports/"
"""Where in the IG's bucket MWM puts an export task's files that live elsewhere."""


@dataclass(frozen=True)
class RequestedFile:
    """One file of a workflow request: its object key and its ``.dcm.json`` key in the request's bucket."""

    key: str
    metadata_key: str | None


def requested_files(request: WorkflowRequestEvent) -> list[RequestedFile]:
    """The request's files as object keys (``{payload_id}/{path}``), each once."""
    prefix = f"{request.payload_id}/"
    files: dict[str, RequestedFile] = {}
    for item in request.payload:
        key = prefix + item.path.lstrip("/")
        metadata = prefix + item.metadata.lstrip("/") if item.metadata else None
        files.setdefault(key, RequestedFile(key, metadata))
    return list(files.values())


def identifiers_from_dicom_json(document: Any) -> DicomIdentifiers | None:
    """The identifiers in a DICOM JSON model; None when one it must have is missing or invalid."""
    if not isinstance(document, Mapping):
        return None
    values: dict[str, str | None] = {}
    for tag, field in DICOM_JSON_TAGS.items():
        element = document.get(tag) or document.get(tag.lower())
        value = element.get("Value") if isinstance(element, Mapping) else None
        first = value[0] if isinstance(value, list) and value else None
        values[field] = str(first).strip(" \x00") if isinstance(first, str | int | float) else None
    try:
        return DicomIdentifiers.model_validate(values)
    except ValidationError:
        return None


def application_names(workflows: Iterable[str]) -> list[str]:
    """The entries of a request's ``workflows`` that can name an MWM application (others are the IG's)."""
    return sorted({name for name in workflows if _APPLICATION_NAME.match(name)})


def direct_bucket_id(payload_id: str, placement: Placement) -> str:
    """The bucket of one application revision for one request: the same request maps to the same id."""
    digest = hashlib.sha256(payload_id.encode()).hexdigest()[:20]
    return f"ig.{placement.application}.r{placement.revision}.{digest}"


def direct_buckets(
    payload_id: str, correlation_id: str, placed: Sequence[tuple[Placement, BucketFile]], now: datetime
) -> list[BucketReady]:
    """One closed bucket per application revision, holding every file of the request it accepted."""
    by_application: dict[tuple[str, int], list[tuple[Placement, BucketFile]]] = {}
    for placement, member in placed:
        by_application.setdefault((placement.application, placement.revision), []).append((placement, member))
    buckets = []
    for members in by_application.values():
        placement = members[0][0]
        files = sorted(
            {member.file.key: member for _, member in members}.values(),
            key=lambda f: (f.dicom.series_instance_uid, f.dicom.sop_instance_uid, f.file.key),
        )
        values = sorted({p.grouping_value for p, _ in members})
        buckets.append(
            BucketReady(
                correlation_id=correlation_id,
                bucket_id=direct_bucket_id(payload_id, placement),
                application_id=placement.application,
                application_revision=placement.revision,
                grouping_tag=placement.grouping_tag,
                grouping_value="\\".join(values),  # DICOM's multi-value separator
                files=files,
                opened_at=now,
                closed_at=now,
            )
        )
    return buckets


def ig_keys(task_id: str, files: Sequence[FileRef], ig_bucket: str) -> dict[str, FileRef]:
    """The IG's object key of each file, de-duplicated: files in its bucket keep their key, others are
    copied under ``mwm-exports/<task id>/<bucket>/<key>``."""
    keys: dict[str, FileRef] = {}
    for file in files:
        key = (
            file.key if file.bucket == ig_bucket else f"{IG_EXPORTS_PREFIX}{task_id}/{file.bucket}/{file.key}"
        )
        keys.setdefault(key, file)
    return keys


def copied_for(key: str) -> str | None:
    """The export task a copy in the IG's bucket was made for (``mwm-exports/<task id>/...``), else None."""
    if not key.startswith(IG_EXPORTS_PREFIX):
        return None
    task_id, _, rest = key[len(IG_EXPORTS_PREFIX) :].partition("/")
    return task_id if task_id and rest else None


def past_retention(task: ExportTask | None, cutoff: datetime) -> bool:
    """Whether what MWM keeps for an IG task may go: the task is final and completed before ``cutoff``, or
    gone (``None``: only final tasks are purged). An unfinished task keeps everything, whatever its age."""
    if task is None:
        return True
    return task.is_final and task.completed_at is not None and task.completed_at < cutoff


_OUTCOMES: dict[ExportStatus, ExportOutcome] = {
    ExportStatus.Success: "succeeded",
    ExportStatus.PartialFailure: "partial",
    ExportStatus.Failure: "failed",
}


def completion_result(
    completion: ExportCompleteEvent, sent: Mapping[str, str], earlier: Sequence[FileExportResult] = ()
) -> tuple[ExportOutcome, list[FileExportResult], str]:
    """The task's outcome, a result per file and the message, from the IG's completion.

    ``sent`` maps each IG key sent to the MWM key it stands for; ``earlier`` holds the results recorded
    before the hand-off (files the sink's extensions skipped), which stand as they are.
    """
    message = (completion.message or "").strip()
    statuses = {key.lstrip("/"): status for key, status in completion.file_statuses.items()}
    missing_ok = completion.status is ExportStatus.Success
    results = list(earlier)
    for ig_key, mwm_key in sent.items():
        status = statuses.get(ig_key)
        if status is FileExportStatus.Success or (status is None and missing_ok):
            results.append(FileExportResult(key=mwm_key, status="succeeded"))
            continue
        what = f"IG file status {status.name}" if status is not None else "no file status from the IG"
        error = (
            f"{what} ({completion.status.name}): {message}"
            if message
            else f"{what} ({completion.status.name})"
        )
        results.append(FileExportResult(key=mwm_key, status="failed", error=error))
    outcome = _OUTCOMES.get(completion.status) or export_outcome(results)
    return outcome, results, message or summary(results)


class IgExport(BaseModel):
    """One export task's hand-off to the IG: what its completion is mapped back with, and its deadline."""

    model_config = ConfigDict(frozen=True)

    export_task_id: str
    job_id: str
    routing_key: str
    sent: dict[str, str] = Field(description="IG object key -> MWM object key")
    skipped: list[FileExportResult] = Field(default_factory=list)
    deadline: datetime
    published_at: datetime | None = None
    resolved: bool = False
