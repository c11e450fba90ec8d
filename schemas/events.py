"""The bus contract: one pydantic model per event.

Every event travels as a persistent JSON message on the ``mwm`` topic exchange. Its routing key is
``event_type`` (``export.requested`` adds the sink type), and the AMQP ``type`` property is
``<event_type>.v<version>`` (see ``Event.type_name``). Consumers ignore unknown fields, so adding an
optional field is a compatible change; anything else is a new version.
JSON Schema files and an AsyncAPI document are generated from these models (``python -m schemas.generate``).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

Uid = Annotated[str, StringConstraints(pattern=r"^[0-9]+(\.[0-9]+)*$", max_length=64)]
AeTitle = Annotated[str, StringConstraints(pattern=r"^[^\\\x00-\x1f]{1,16}$", strip_whitespace=True)]
Identifier = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")]
ObjectKey = Annotated[str, StringConstraints(min_length=1, max_length=1024)]


def utc_now() -> datetime:
    """Now, timezone-aware UTC."""
    return datetime.now(UTC)


class Contract(BaseModel):
    """Base of every model on the bus: immutable, unknown fields ignored."""

    model_config = ConfigDict(frozen=True, extra="ignore")


class FileRef(Contract):
    """A file in the object store."""

    bucket: str = Field(min_length=3, max_length=63, description="object-store bucket")
    key: ObjectKey = Field(description="object key inside the bucket")
    size: int = Field(ge=0, description="size in bytes")
    content_type: str = Field("application/dicom", description="MIME type")


class DicomIdentifiers(Contract):
    """The DICOM identifiers MWM matches and groups on, read from the file's header."""

    study_instance_uid: Uid
    series_instance_uid: Uid
    sop_instance_uid: Uid
    sop_class_uid: Uid
    modality: str | None = Field(None, max_length=16)
    patient_id: str | None = Field(None, max_length=64)
    accession_number: str | None = Field(None, max_length=16)


class Event(Contract):
    """Fields every event carries. ``correlation_id`` follows a study end to end."""

    event_type: ClassVar[str]
    version: ClassVar[int] = 1

    correlation_id: Identifier = Field(description="follows the study from arrival to export")
    occurred_at: datetime = Field(default_factory=utc_now, description="when the event happened (UTC)")

    @classmethod
    def type_name(cls) -> str:
        """The AMQP ``type`` property: event name and version."""
        return f"{cls.event_type}.v{cls.version}"

    def routing_key(self) -> str:
        """Where this event is published on the topic exchange."""
        return self.event_type

    def must_route(self) -> bool:
        """Whether an MWM consumer must receive it: if no queue is bound, publishing fails loudly."""
        return True


class InformationalEvent(Event):
    """An event published for other systems: no MWM consumer needs it, so no queue need be bound."""

    def must_route(self) -> bool:
        return False


class PayloadArrived(Event):
    """A DICOM file was stored in the object store (by the gateway, the Payloads API or an external IG)."""

    event_type: ClassVar[str] = "mwm.payload.arrived"

    payload_id: Identifier = Field(description="the association or upload this file came in with")
    file: FileRef
    dicom: DicomIdentifiers
    calling_ae_title: AeTitle | None = Field(None, description="the sender's AE title (DIMSE)")
    called_ae_title: AeTitle | None = Field(None, description="the AE title the file was sent to")
    source: Literal["dimse", "upload", "external"] = Field("external", description="how the file came in")
    application_ids: list[Identifier] = Field(
        default_factory=list, description="explicit target applications; bypasses AE title matching"
    )
    interrupted: bool = Field(
        False,
        description="the file came in an association that was aborted and not retried within the grace "
        "period: its study may be incomplete",
    )


class BucketFile(Contract):
    """One file of a closed bucket."""

    file: FileRef
    dicom: DicomIdentifiers


class BucketReady(Event):
    """A bucket's quiet period ended: its files are ready to be processed by one application."""

    event_type: ClassVar[str] = "mwm.bucket.ready"

    bucket_id: Identifier
    application_id: Identifier
    application_revision: int = Field(ge=1)
    grouping_tag: str = Field(description="DICOM tag grouped on, e.g. 0020,000D")
    grouping_value: str
    files: list[BucketFile] = Field(min_length=1)
    opened_at: datetime
    closed_at: datetime
    possibly_incomplete: bool = Field(
        False, description="a file came from an aborted association that was not retried in time"
    )


class JobEvent(Event):
    """Fields every event of a job carries: the job, the bucket it runs on, the application it runs."""

    job_id: Identifier
    bucket_id: Identifier
    application_id: Identifier
    application_revision: int = Field(ge=1)


class JobLaunched(JobEvent):
    """A job was submitted to its engine."""

    event_type: ClassVar[str] = "mwm.job.launched"

    engine: str = Field(description="engine plugin name, e.g. local or argo")
    engine_job_id: str = Field(min_length=1, description="the engine's id, e.g. the Argo workflow name")
    input_prefix: str = Field(description="object-store prefix holding exactly the job's inputs")
    output_prefix: str = Field(description="object-store prefix the job writes its outputs to")
    deadline: datetime = Field(description="the job is cancelled and timed out after this")


JobOutcome = Literal["succeeded", "failed", "cancelled", "timed_out"]


class JobFinished(JobEvent, InformationalEvent):
    """A job reached a terminal state."""

    event_type: ClassVar[str] = "mwm.job.finished"

    engine: str
    engine_job_id: str | None = None
    status: JobOutcome
    message: str = ""
    outputs: list[FileRef] = Field(default_factory=list)


class SinkRef(Contract):
    """An export sink by name and type."""

    name: Identifier
    type: Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_-]{0,31}$")]


class ExportRequested(Event):
    """Files to send to one sink. Routing key ``mwm.export.requested.<sink type>``."""

    event_type: ClassVar[str] = "mwm.export.requested"

    export_task_id: Identifier
    job_id: Identifier
    application_id: Identifier
    sink: SinkRef
    files: list[FileRef] = Field(min_length=1)

    def routing_key(self) -> str:
        return f"{self.event_type}.{self.sink.type}"

    def must_route(self) -> bool:
        """MWM's consumers serve ``dicom`` and ``monai-ig`` sinks; others may have no queue (pull clients)."""
        return self.sink.type in ("dicom", "monai-ig")


FileExportStatus = Literal["succeeded", "failed", "skipped"]


class FileExportResult(Contract):
    """What happened to one file of an export task."""

    key: ObjectKey
    status: FileExportStatus
    error: str | None = None


ExportOutcome = Literal["succeeded", "partial", "failed"]


class ExportCompleted(InformationalEvent):
    """An export task ended, with a result per file."""

    event_type: ClassVar[str] = "mwm.export.completed"

    export_task_id: Identifier
    job_id: Identifier
    sink: SinkRef
    status: ExportOutcome
    message: str = ""
    file_results: list[FileExportResult] = Field(default_factory=list)


EVENT_TYPES: tuple[type[Event], ...] = (
    PayloadArrived,
    BucketReady,
    JobLaunched,
    JobFinished,
    ExportRequested,
    ExportCompleted,
)
"""Every event on the bus, in pipeline order."""

EVENTS_BY_TYPE_NAME: dict[str, type[Event]] = {event.type_name(): event for event in EVENT_TYPES}
