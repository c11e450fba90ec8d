"""Valid domain objects and events for the handlers' unit tests, with the fields a test varies."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from devkit.events import payload_arrived
from schemas.applications import ApplicationDefinition, SinkDefinition
from schemas.events import BucketFile, BucketReady, DicomIdentifiers, ExportRequested, FileRef, SinkRef
from wm.domain.discovery import Candidate, Placement, bucket_ready
from wm.domain.jobs import Job, JobState

BUCKET = "mwm-test"

__all__ = [
    "application",
    "bucket_ready_event",
    "candidate",
    "export_requested",
    "job",
    "payload_arrived",
    "sink",
]


def application(name: str = "seg", **changes: Any) -> ApplicationDefinition:
    """An application on the ``local`` engine with a 60 s timeout; ``changes`` override fields."""
    base: dict[str, Any] = {"name": name, "version": "1.0", "map": {"command": ["run"], "timeout_s": 60}}
    return ApplicationDefinition.model_validate({**base, **changes})


def candidate(definition: ApplicationDefinition, revision: int = 1) -> Candidate:
    return Candidate(definition.name, revision, definition)


def sink(name: str = "pacs") -> SinkDefinition:
    return SinkDefinition.model_validate(
        {"name": name, "type": "dicom", "args": {"ae_title": "PACS", "host": "127.0.0.1", "port": 104}}
    )


def ref(key: str) -> FileRef:
    return FileRef(bucket=BUCKET, key=key, size=1)


def bucket_ready_event(definition: ApplicationDefinition, files: int = 2) -> BucketReady:
    """The ``bucket.ready`` of a bucket of ``files`` CT slices of one series."""
    members = [
        BucketFile(
            file=ref(f"payloads/p1/1.2.3.{n}.dcm"),
            dicom=DicomIdentifiers(
                study_instance_uid="1.2.3",
                series_instance_uid="1.2.3.1",
                sop_instance_uid=f"1.2.3.1.{n}",
                sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                modality="CT",
            ),
        )
        for n in range(files)
    ]
    placement = Placement(definition.name, 1, "0020,000D", "1.2.3", 1.0)
    now = datetime.now(UTC)
    return bucket_ready(placement.bucket_id(0), placement, "corr-1", members, now, now)


def job(state: JobState = JobState.launched, **changes: Any) -> Job:
    """A job of application ``seg`` r1 whose engine job is ``engine-job-1``."""
    base: dict[str, Any] = {
        "job_id": "job-1",
        "bucket_id": "seg.r1.abc.g0",
        "correlation_id": "corr-1",
        "application_id": "seg",
        "application_revision": 1,
        "engine": "local",
        "state": state,
        "engine_job_id": None if state is JobState.created else "engine-job-1",
        "input_prefix": "jobs/job-1/input/",
        "output_prefix": "jobs/job-1/output/",
        "deadline": datetime.now(UTC) + timedelta(hours=1),
    }
    return Job.model_validate({**base, **changes})


def export_requested(
    files: list[str], sink_name: str = "pacs", task_id: str = "job-1.pacs"
) -> ExportRequested:
    return ExportRequested(
        correlation_id="corr-1",
        export_task_id=task_id,
        job_id="job-1",
        application_id="seg",
        sink=SinkRef(name=sink_name, type="dicom"),
        files=[ref(key) for key in files],
    )
