"""Definitions users write: applications (one MAP each), export sinks and AE title mappings.

An application definition is a YAML or JSON document validated by ``ApplicationDefinition``. Registering it
creates revision 1; registering a changed definition under the same name through "new revision" creates
revision n+1, and the latest revision that is not deleted is the one new data triggers.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    StringConstraints,
    Tag,
    field_validator,
    model_validator,
)

from schemas.events import AeTitle, Uid

Name = Annotated[str, StringConstraints(pattern=r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")]
"""Lower-case DNS-label style: usable as an id, a Kubernetes label and an Argo workflow name prefix."""

GROUPING_TAGS: dict[str, str] = {
    "0020,000D": "study_instance_uid",
    "0020,000E": "series_instance_uid",
    "0010,0020": "patient_id",
    "0008,0050": "accession_number",
}
"""Tags a bucket can be grouped on, and the field of ``DicomIdentifiers`` that carries each."""


class Definition(BaseModel):
    """Base of user-written definitions: unknown fields are errors (a typo must not pass silently)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Filters(Definition):
    """Which files an application wants; an empty list accepts everything."""

    modalities: list[Annotated[str, StringConstraints(max_length=16)]] = Field(
        default_factory=list, description="only files of these Modality (0008,0060) values, e.g. `CT`"
    )
    sop_class_uids: list[Uid] = Field(default_factory=list, description="only files of these SOP classes")
    calling_ae_titles: list[AeTitle] = Field(
        default_factory=list, description="only files sent by these calling AE titles"
    )


class Discovery(Definition):
    """How files are grouped into buckets, and how long a bucket waits for more."""

    grouping_tag: str = Field(
        "0020,000D",
        description="tag a bucket groups files by: `0020,000D` (StudyInstanceUID), `0020,000E` "
        "(SeriesInstanceUID), `0010,0020` (PatientID) or `0008,0050` (AccessionNumber)",
    )
    quiet_period_s: float = Field(5.0, ge=0.05, le=86400, description="close after this long without a file")
    filters: Filters = Field(default_factory=Filters)

    @field_validator("grouping_tag")
    @classmethod
    def _known_tag(cls, value: str) -> str:
        tag = value.upper()
        if tag not in GROUPING_TAGS:
            raise ValueError(f"grouping on {value!r} is not supported; use one of {', '.join(GROUPING_TAGS)}")
        return tag


class MapSpec(Definition):
    """The MONAI Application Package: a container image, or a command for the local engine."""

    image: str | None = Field(None, description="container image (docker/podman, Argo)")
    command: list[str] = Field(default_factory=list, description="command; without an image, run locally")
    environment: dict[str, str] = Field(default_factory=dict, description="environment variables of the MAP")
    cpu: float | None = Field(None, gt=0, description="CPU limit (cores)")
    memory: Annotated[str, StringConstraints(pattern=r"^[0-9]+(Ki|Mi|Gi|Ti)?$")] | None = Field(
        None, description="memory limit, Kubernetes quantity (`4Gi`)"
    )
    gpu: int = Field(0, ge=0, le=16, description="GPUs to request")
    timeout_s: int = Field(3600, ge=1, le=7 * 86400, description="the job is cancelled after this")


class ArgoOptions(Definition):
    """Argo-specific settings of an application."""

    namespace: str = Field("argo", description="namespace the workflow runs in")
    workflow_template: str | None = Field(
        None, description="use this WorkflowTemplate instead of a generated one"
    )
    service_account: str | None = Field(None, description="ServiceAccount of the workflow pods")


class EngineSpec(Definition):
    """Where the application runs."""

    name: Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_-]{0,31}$")] = Field(
        "local",
        description="engine plugin: `local` (one machine) or `argo` (Argo Workflows), or a site's own",
    )
    argo: ArgoOptions | None = Field(None, description="options of the `argo` engine (required by it)")


class ApplicationDefinition(Definition):
    """One application (one MAP): what triggers it, how it runs and where its results go."""

    name: Name = Field(description="unique name: lower-case letters, digits and `-` (a DNS label)")
    version: Annotated[str, StringConstraints(min_length=1, max_length=64)] = Field(
        description="the application's own version, recorded on every job"
    )
    description: str = Field("", max_length=500, description="free text for people")
    ae_titles: list[AeTitle] = Field(default_factory=list, description="AE titles whose data triggers it")
    discovery: Discovery = Field(default_factory=Discovery)
    map: MapSpec
    engine: EngineSpec = Field(default_factory=EngineSpec)
    sinks: list[Name] = Field(default_factory=list, description="export sinks by name")


class DicomSinkArgs(Definition):
    """Where a DICOM sink sends: a C-STORE SCP."""

    ae_title: AeTitle
    host: Annotated[str, StringConstraints(min_length=1, max_length=253)]
    port: int = Field(ge=1, le=65535)
    calling_ae_title: AeTitle = "MWM"
    max_associations: int = Field(
        1,
        ge=1,
        le=16,
        description="parallel associations the destination accepts (one export sends over up to this many)",
    )


class MonaiIgSinkArgs(Definition):
    """Where a MONAI Informatics Gateway sends: its export agent and destinations registered in it."""

    agent: Literal["monaiscu", "monaidicomweb"] = Field(
        "monaiscu", description="the IG's export service: DIMSE SCU or DICOMweb STOW"
    )
    destinations: list[Annotated[str, StringConstraints(min_length=1, max_length=256)]] = Field(
        min_length=1, description="destination names as registered in the IG (POST /config/destination)"
    )
    plug_in_assemblies: list[str] = Field(default_factory=list, description="IG outbound data plug-ins")


UNION_TAGS = frozenset({"DicomSinkArgs", "MonaiIgSinkArgs"})
"""Tags of the sink ``args`` union: they appear in validation error locations, not in field paths."""


def _args_kind(args: object) -> str:
    """Which sink args a value is: a MONAI IG's names ``destinations`` (or ``agent``), a C-STORE SCP not."""
    if isinstance(args, dict):
        return "MonaiIgSinkArgs" if {"destinations", "agent"} & set(args) else "DicomSinkArgs"
    return type(args).__name__


class SinkDefinition(Definition):
    """An export sink (the seed's Sink.Create).

    ``dicom``: MWM sends the files itself by C-STORE to ``args``. ``external``: an export client (an
    Informatics Gateway) pulls the tasks through the Export API, or binds a queue to
    ``mwm.export.requested.external``; it needs no ``args``. ``monai-ig``: MWM hands the files to a
    MONAI Informatics Gateway (``md.export.request.<agent>``), which sends them to its ``destinations``.
    """

    name: Name
    type: Literal["dicom", "external", "monai-ig"] = "dicom"
    extensions: list[str] = Field(default_factory=lambda: [".dcm"], description="only files ending so export")
    args: (
        Annotated[
            Annotated[DicomSinkArgs, Tag("DicomSinkArgs")]
            | Annotated[MonaiIgSinkArgs, Tag("MonaiIgSinkArgs")],
            Discriminator(_args_kind),
        ]
        | None
    ) = None

    @model_validator(mode="after")
    def _args_match_type(self) -> SinkDefinition:
        if self.type == "dicom" and not isinstance(self.args, DicomSinkArgs):
            raise ValueError("a dicom sink needs args (ae_title, host, port)")
        if self.type == "monai-ig" and not isinstance(self.args, MonaiIgSinkArgs):
            raise ValueError("a monai-ig sink needs args (agent, destinations)")
        return self


class CallingPeer(Definition):
    """A sender allowed to use an AE title; ``host`` None allows any address."""

    ae_title: AeTitle
    host: str | None = None


class AeTitleMapping(Definition):
    """An AE title the gateway answers, the applications it triggers and who may send to it."""

    ae_title: AeTitle
    applications: list[Name] = Field(default_factory=list)
    allowed_callers: list[CallingPeer] = Field(default_factory=list, description="empty: any caller may send")
