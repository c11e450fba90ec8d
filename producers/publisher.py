"""Announcing stored files: a small library for gateways that store DICOM files themselves.

An Informatics Gateway (or any other producer) that writes files to the object store on its own only has
to tell MWM about them: one ``mwm.payload.arrived`` event per file, published persistently with publisher
confirms. `PayloadPublisher` builds and validates that event and publishes it; MWM's gateway uses it too.

Example::

    from producers.publisher import PayloadPublisher
    from schemas.events import FileRef
    from wm.config import Settings
    from wm.dicom import read_identifiers

    settings = Settings()
    async with PayloadPublisher(settings.bus) as publisher:
        ref = FileRef(bucket="mwm", key="payloads/p-1/1.2.3/1.2.3.4/1.2.3.4.5.dcm", size=528_384)
        message_id = await publisher.file_stored(
            payload_id="p-1",
            file=ref,
            dicom=read_identifiers("/data/1.2.3.4.5.dcm"),
            called_ae_title="MWM-CT",
            calling_ae_title="CT-SCANNER",
        )

Idempotency: the message id defaults to a UUID derived from the file's bucket and key, so publishing the
same stored file twice (after a crash, say) carries the same id and MWM's consumers treat the second copy
as a duplicate. Errors: invalid inputs raise `InvalidMessage` (nothing is published); a broker that is down
or does not confirm raises `TransientError` (retry later: the event may or may not have been published).
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any, Literal, Self

from pydantic import BaseModel, ValidationError

from schemas.events import DicomIdentifiers, FileRef, PayloadArrived
from wm.adapters.rabbitmq import Bus
from wm.config import BusSettings
from wm.errors import InvalidMessage

__all__ = ["MESSAGE_ID_NAMESPACE", "PayloadPublisher", "file_message_id"]

MESSAGE_ID_NAMESPACE = uuid.UUID("6f1b7d0e-4a52-4c1f-9a51-2f0f1c6e8a31")
"""Namespace of the deterministic message ids (UUID 5 of ``<bucket>/<key>``)."""

Source = Literal["dimse", "upload", "external"]


def file_message_id(file: FileRef) -> str:
    """The message id of the payload.arrived announcing ``file``: stable across re-publishes."""
    return str(uuid.uuid5(MESSAGE_ID_NAMESPACE, f"{file.bucket}/{file.key}"))


class PayloadPublisher:
    """Publishes ``payload.arrived`` for files already in the object store.

    ``PayloadPublisher(bus_settings)`` opens (and closes) its own broker connection;
    ``PayloadPublisher.over(bus)`` reuses an open `Bus` and leaves it open.
    """

    def __init__(self, settings: BusSettings | None = None, *, bus: Bus | None = None) -> None:
        if (settings is None) == (bus is None):
            raise ValueError("give either bus settings or an open Bus")
        self._bus = bus or Bus(settings)  # type: ignore[arg-type]
        self._owns_bus = bus is None

    @classmethod
    def over(cls, bus: Bus) -> PayloadPublisher:
        """A publisher on an already open `Bus` (not closed on exit)."""
        return cls(bus=bus)

    async def __aenter__(self) -> Self:
        if self._owns_bus:
            await self._bus.__aenter__()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._owns_bus:
            await self._bus.close()

    async def file_stored(
        self,
        *,
        payload_id: str,
        file: FileRef | Mapping[str, Any],
        dicom: DicomIdentifiers | Mapping[str, Any],
        correlation_id: str | None = None,
        calling_ae_title: str | None = None,
        called_ae_title: str | None = None,
        source: Source = "external",
        application_ids: Sequence[str] = (),
        message_id: str | None = None,
        interrupted: bool = False,
    ) -> str:
        """Announce one stored file; returns the message id once the broker confirmed it.

        ``payload_id`` groups the files of one association or upload and is the default
        ``correlation_id``. ``application_ids``, when given, bypass AE title matching. ``interrupted``: the
        file's association was aborted and not retried (its study may be incomplete).
        """
        event = build_payload_arrived(
            payload_id=payload_id,
            file=file,
            dicom=dicom,
            correlation_id=correlation_id or payload_id,
            calling_ae_title=calling_ae_title,
            called_ae_title=called_ae_title,
            source=source,
            application_ids=list(application_ids),
            interrupted=interrupted,
        )
        return await self._bus.publish(event, message_id=message_id or file_message_id(event.file))


def build_payload_arrived(**fields: Any) -> PayloadArrived:
    """A validated `PayloadArrived`; `InvalidMessage` lists every invalid field."""
    try:
        return PayloadArrived.model_validate(_plain(fields))
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise InvalidMessage(f"invalid payload.arrived: {problems}") from exc


def _plain(fields: Mapping[str, Any]) -> dict[str, Any]:
    """Nested models as dicts, so pydantic validates every field the same way."""
    return {k: v.model_dump() if isinstance(v, BaseModel) else v for k, v in fields.items()}
