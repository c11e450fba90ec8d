"""The MONAI Deploy Informatics Gateway's (IG) messages, as MWM reads and writes them.

These are not MWM events: they travel on the IG's own exchange (``monaideploy``), their AMQP ``type`` is
the C# class name, and their bodies are Newtonsoft.Json with snake_case names (``Target`` and the
``DataOrigin`` members in camelCase). One model per message covers the IG 0.3, 0.4 and 0.5 bodies:

- ``WorkflowRequestEvent`` (``md.workflow.request``, IG -> MWM): 0.3 carries ``calling_aetitle`` /
  ``called_aetitle``; 0.4 replaced them with ``trigger`` (a ``DataOrigin``) plus ``data_origins``,
  ``workflow_instance_id`` and ``task_id``; 0.5 adds ``artifactType`` to ``DataOrigin``.
- ``ExportRequestEvent`` (``md.export.request.<agent>``, MWM -> IG).
- ``ExportCompleteEvent`` (``md.export.complete``, IG -> MWM): ``status`` is a name, ``file_statuses``
  values are integers (absent before messaging 0.1.8, i.e. IG 0.3.0-0.3.1).

Reading is tolerant, as the gateway's own reader is: property names match case-insensitively, unknown
fields are ignored, and an enum may come as its integer or its name.
"""

from __future__ import annotations

from datetime import datetime
from enum import IntEnum
from typing import Annotated, Any, ClassVar

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

NonBlank = Annotated[
    str,
    Field(min_length=1),
    BeforeValidator(lambda value: value.strip() if isinstance(value, str) else value),
]


class DataService(IntEnum):
    """How data reached the gateway (``DataService`` upstream; serialized as an integer)."""

    Unknown = 0
    DIMSE = 1
    DicomWeb = 2
    FHIR = 3
    HL7 = 4
    ACR = 5


class ExportStatus(IntEnum):
    """An export request's overall outcome (serialized by name in ``ExportCompleteEvent``)."""

    Success = 0
    Failure = 1
    PartialFailure = 2
    Unknown = 3


class FileExportStatus(IntEnum):
    """One file's export outcome (serialized as an integer)."""

    Success = 0
    ConfigurationError = 1
    UnsupportedDataType = 2
    ServiceError = 3
    DownloadError = 4
    Unknown = 5


def enum_member(enum: type[IntEnum]) -> BeforeValidator:
    """Accept an enum as its integer, its digits or its name (any case)."""

    def parse(value: Any) -> Any:
        if isinstance(value, str):
            if value.strip().lstrip("-").isdigit():
                return int(value)
            by_name = {member.name.lower(): member for member in enum}
            if value.strip().lower() in by_name:
                return by_name[value.strip().lower()]
            raise ValueError(f"{value!r} is not one of {', '.join(member.name for member in enum)}")
        return value

    return BeforeValidator(parse)


class IgMessage(BaseModel):
    """Base of the IG's messages: unknown fields ignored, property names matched case-insensitively."""

    model_config = ConfigDict(frozen=True, extra="ignore", populate_by_name=True)

    message_type: ClassVar[str]
    """The AMQP ``type`` property: the C# class name."""

    @model_validator(mode="before")
    @classmethod
    def _names_any_case(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        names: dict[str, str] = {}
        for name, field in cls.model_fields.items():
            names[name.lower()] = names[(field.alias or name).lower()] = field.alias or name
        return {names.get(str(key).lower(), key): value for key, value in data.items()}


class DataOrigin(IgMessage):
    """Where data came from: for DIMSE, ``source`` is the calling and ``destination`` the called AE title."""

    data_service: Annotated[DataService, enum_member(DataService)] = Field(
        DataService.Unknown, alias="dataService"
    )
    source: str = Field(min_length=1)
    destination: str | None = None
    artifact_type: int | None = Field(None, alias="artifactType", description="IG 0.5: from the Modality")


class PayloadFile(IgMessage):
    """One file of a payload, relative to ``{payload_id}/`` in the request's bucket."""

    path: NonBlank
    metadata: str | None = Field(None, description="its DICOM JSON (`.dcm.json`), relative likewise")


class WorkflowRequestEvent(IgMessage):
    """A payload the gateway stored (``md.workflow.request``)."""

    message_type: ClassVar[str] = "WorkflowRequestEvent"

    payload_id: NonBlank
    workflows: list[str] = Field(default_factory=list, description="from the IG's AE title configuration")
    file_count: int = Field(ge=0)
    correlation_id: NonBlank
    bucket: NonBlank
    calling_aetitle: str | None = Field(None, description="IG 0.3")
    called_aetitle: str | None = Field(None, description="IG 0.3")
    trigger: DataOrigin | None = Field(None, description="IG 0.4+")
    data_origins: list[DataOrigin] = Field(default_factory=list, description="IG 0.4+")
    timestamp: datetime
    workflow_instance_id: str | None = Field(None, description="IG 0.4+: set only for returned artifacts")
    task_id: str | None = Field(None, description="IG 0.4+: set only for returned artifacts")
    payload: list[PayloadFile] = Field(min_length=1)

    @model_validator(mode="after")
    def _an_origin(self) -> WorkflowRequestEvent:
        if self.trigger is None and not self.calling_aetitle:
            raise ValueError("neither trigger (IG 0.4+) nor calling_aetitle (IG 0.3) is set")
        return self

    @property
    def calling_ae_title(self) -> str | None:
        """The sender's AE title (DIMSE) from ``trigger``, or from the 0.3 field."""
        return self.trigger.source if self.trigger is not None else self.calling_aetitle

    @property
    def called_ae_title(self) -> str | None:
        """The AE title the data was sent to, from ``trigger``, or from the 0.3 field."""
        return self.trigger.destination if self.trigger is not None else self.called_aetitle

    @property
    def returns_artifacts(self) -> bool:
        """Data returned for a running workflow instance's task: a Workflow Manager's, not MWM's."""
        return bool(self.workflow_instance_id and self.task_id)


class ExportRequestEvent(IgMessage):
    """An export task for the gateway (``md.export.request.<agent>``); fields in upstream order."""

    message_type: ClassVar[str] = "ExportRequestEvent"

    workflow_instance_id: NonBlank
    export_task_id: NonBlank
    files: list[NonBlank] = Field(min_length=1, description="object keys in the IG's bucket, no duplicates")
    destinations: list[NonBlank] = Field(min_length=1, description="destination names registered in the IG")
    correlation_id: NonBlank
    delivery_tag: str | None = None
    message_id: str | None = None
    error_messages: list[str] = Field(default_factory=list)
    plug_in_assemblies: list[str] = Field(default_factory=list, description="outbound data plug-ins")
    payload_id: str | None = Field(None, description="messaging 2.0.3+")
    target: DataOrigin | None = Field(None, alias="Target", description="messaging 1.0.5+")


class ExportCompleteEvent(IgMessage):
    """What the gateway did with an export request (``md.export.complete``)."""

    message_type: ClassVar[str] = "ExportCompleteEvent"

    workflow_instance_id: NonBlank
    export_task_id: NonBlank
    status: Annotated[ExportStatus, enum_member(ExportStatus)]
    message: str | None = None
    file_statuses: dict[str, Annotated[FileExportStatus, enum_member(FileExportStatus)]] = Field(
        default_factory=dict, description="absent before messaging 0.1.8 (IG 0.3.0-0.3.1)"
    )

    @model_validator(mode="before")
    @classmethod
    def _null_statuses(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("file_statuses", {}) is None:
            return {**data, "file_statuses": {}}
        return data


IG_MESSAGES: tuple[type[IgMessage], ...] = (WorkflowRequestEvent, ExportRequestEvent, ExportCompleteEvent)
"""Every IG message MWM reads or writes."""
