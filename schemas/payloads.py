"""The Payloads API models: what an upload stored and refused, and what a payload holds.

A payload is the set of files that came in together (one association at the gateway, one request to
``POST /payloads``); its files live under ``payloads/<payload id>/`` in the object store.
"""

from __future__ import annotations

from pydantic import BaseModel, Field

from schemas.events import Identifier, ObjectKey, Uid


class StoredFile(BaseModel):
    """One file of a payload in the object store."""

    key: ObjectKey = Field(description="object key: payloads/<payload>/<study>/<series>/<sop>.dcm")
    size: int = Field(ge=0, description="size in bytes")
    study_instance_uid: Uid
    series_instance_uid: Uid
    sop_instance_uid: Uid


class UploadedFile(StoredFile):
    """A file an upload stored and announced on ``mwm.payload.arrived``."""

    part: int = Field(ge=0, description="0-based position of the file in the request")


class FailedPart(BaseModel):
    """A part of an upload that was not stored (nothing announced for it)."""

    part: int = Field(ge=0, description="0-based position of the part in the request")
    error: str


class UploadResult(BaseModel):
    """The response to ``POST /payloads``."""

    payload_id: Identifier
    files: list[UploadedFile] = Field(default_factory=list)
    failed: list[FailedPart] = Field(default_factory=list)
