"""``/payloads``: upload DICOM files (Payload.Upload) and download them (Payload.Download).

``POST /payloads`` takes one file (``application/dicom``) or many (``multipart/related;
type="application/dicom"``, the DICOMweb STOW shape, or ``multipart/form-data``), streamed: each part is
spooled to a temporary file as it arrives (`wm.api.spool`), its header read without pixel data
(`wm.dicom.read_identifiers`), uploaded to ``payloads/<payload id>/<study>/<series>/<sop>.dcm``
(`wm.dicom.object_key`), then announced with one ``mwm.payload.arrived`` (source ``upload``, correlation
id = payload id = a new UUID per request; message id derived from the key, as the gateway does). The query
names what the files trigger: ``called_ae_title`` (the applications mapped to that AE title) and/or
``application`` (repeatable: those applications, bypassing AE title matching); unknown ones are refused
with 422 before the body is read.

Answers 201 with the stored files and the parts refused (not DICOM, an identifier missing, the body broken
off); 422 when no part was stored; 415 for another content type; 503 with ``Retry-After`` when the object
store or the broker fails (the detail says how many files were already stored and announced).

Downloads: ``GET /payloads/{id}`` lists the payload's files (from the object store), ``.../files/{sop}``
streams one file, ``.../archive`` streams every file as an uncompressed POSIX tar (``application/x-tar``,
``<payload id>/<study>/<series>/<sop>.dcm``): tar streams with no seeking and no buffering, where zip
would need a seekable output or data descriptors.
"""

from __future__ import annotations

import asyncio
import tarfile
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Annotated

import structlog
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import StreamingResponse
from pydantic import ValidationError

from producers.publisher import PayloadPublisher
from schemas.events import AeTitle, FileRef, Identifier, Uid
from schemas.payloads import FailedPart, StoredFile, UploadedFile, UploadResult
from wm.adapters.objectstore import ObjectStore
from wm.api.deps import GATEWAY, GATEWAY_READ, BusDep, ObjectsDep, PageDep, RegistryDep
from wm.api.spool import DICOM, BrokenBody, SpooledPart, spooled_parts
from wm.dicom import PAYLOADS, InvalidDicom, object_key, payload_prefix, read_identifiers
from wm.errors import NotFound, TransientError, ValidationFailed
from wm.registry import Page, Registry

router = APIRouter(prefix="/payloads", tags=["payloads"])
log = structlog.get_logger("wm.api.payloads")

TAR_BLOCK = tarfile.BLOCKSIZE
_BINARY = {"schema": {"type": "string", "format": "binary"}}
_UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            DICOM: _BINARY,
            'multipart/related; type="application/dicom"': _BINARY,
            "multipart/form-data": {"schema": {"type": "object", "additionalProperties": _BINARY}},
        },
    }
}


@dataclass(frozen=True)
class Target:
    """What the uploaded files trigger: the applications mapped to an AE title, or named ones."""

    called_ae_title: str | None = None
    application_ids: tuple[str, ...] = ()


async def upload_target(
    registry: RegistryDep,
    called_ae_title: Annotated[
        AeTitle | None, Query(description="trigger the applications mapped to this AE title")
    ] = None,
    application: Annotated[
        list[Identifier] | None,
        Query(description="trigger this application (repeatable); bypasses AE title matching"),
    ] = None,
) -> Target:
    """The upload's target, refused (422) when it names an unknown AE title or application."""
    errors = await _unknown_targets(registry, called_ae_title, application or [])
    if errors:
        raise ValidationFailed(errors)
    return Target(called_ae_title, tuple(application or ()))


async def _unknown_targets(
    registry: Registry, called_ae_title: str | None, applications: list[str]
) -> list[dict[str, str]]:
    errors = []
    # The gateway's rule (`producers.gateway_admission.admit`): an AE title that triggers no application
    # (never mapped, or its applications deleted) is refused, so both ways in behave alike.
    mapping = await registry.mapping(called_ae_title) if called_ae_title else None
    if called_ae_title and (mapping is None or not mapping.applications):
        message = f"AE title {called_ae_title!r} is not mapped to any application"
        errors.append({"field": "query.called_ae_title", "message": message})
    known = {revision.name for revision in await registry.applications.latest_of(applications)}
    for name in sorted(set(applications) - known):
        errors.append({"field": "query.application", "message": f"unknown application {name!r}"})
    return errors


@dataclass
class Upload:
    """One ``POST /payloads`` request in progress."""

    payload_id: str
    objects: ObjectStore
    publisher: PayloadPublisher
    target: Target
    result: UploadResult = field(init=False)

    def __post_init__(self) -> None:
        self.result = UploadResult(payload_id=self.payload_id)

    async def add(self, item: SpooledPart | BrokenBody) -> None:
        """Store and announce one part, or record why it was refused."""
        if isinstance(item, BrokenBody):
            self.result.failed.append(FailedPart(part=item.index, error=item.error))
            return
        try:
            self.result.files.append(await self._ingest(item))
        except InvalidDicom as exc:
            self.result.failed.append(FailedPart(part=item.index, error=str(exc)))

    async def _ingest(self, part: SpooledPart) -> UploadedFile:
        part.file.seek(0)
        ids = await asyncio.to_thread(read_identifiers, part.file)
        part.file.seek(0)
        ref = await self.objects.put_stream(object_key(self.payload_id, ids), part.file, part.size)
        await self.publisher.file_stored(
            payload_id=self.payload_id,
            file=ref,
            dicom=ids,
            called_ae_title=self.target.called_ae_title,
            source="upload",
            application_ids=self.target.application_ids,
        )
        return UploadedFile(
            part=part.index,
            key=ref.key,
            size=ref.size,
            study_instance_uid=ids.study_instance_uid,
            series_instance_uid=ids.series_instance_uid,
            sop_instance_uid=ids.sop_instance_uid,
        )


@router.post("", status_code=201, dependencies=GATEWAY, openapi_extra=_UPLOAD_BODY)
async def upload_payload(
    request: Request, objects: ObjectsDep, bus: BusDep, target: Annotated[Target, Depends(upload_target)]
) -> UploadResult:
    """Store and announce the uploaded DICOM files as one new payload (see the module doc)."""
    upload = Upload(uuid.uuid4().hex, objects, PayloadPublisher.over(bus), target)
    started = time.perf_counter()
    with structlog.contextvars.bound_contextvars(correlation_id=upload.payload_id):
        await _read_all(request, upload)
        result = upload.result
        log.info(
            "payload_uploaded",
            files=len(result.files),
            failed=len(result.failed),
            bytes=sum(file.size for file in result.files),
            duration_ms=round((time.perf_counter() - started) * 1000, 1),
        )
    if not result.files:
        errors = [{"field": f"parts[{f.part}]", "message": f.error} for f in result.failed]
        raise ValidationFailed(errors or [{"field": "body", "message": "the request holds no file"}])
    return result


async def _read_all(request: Request, upload: Upload) -> None:
    """Feed every part to ``upload``; a store or broker failure says what was already done."""
    try:
        async with aclosing(spooled_parts(request)) as parts:
            async for item in parts:
                try:
                    await upload.add(item)
                finally:
                    if isinstance(item, SpooledPart):
                        item.close()
    except TransientError as exc:
        done = len(upload.result.files)
        log.warning("payload_upload_failed", error=str(exc), files_stored=done)
        raise TransientError(
            f"{exc}; {done} file(s) had been stored and announced under payload {upload.payload_id}"
        ) from exc


@router.get("/{payload_id}", dependencies=GATEWAY_READ)
async def list_payload(payload_id: Identifier, objects: ObjectsDep, page: PageDep) -> Page[StoredFile]:
    """The payload's files by key (404 when it has none)."""
    files = await _payload_files(objects, payload_id)
    return page.of(files[page.skip : page.skip + page.page_size], len(files))


@router.get(
    "/{payload_id}/files/{sop_instance_uid}",
    dependencies=GATEWAY_READ,
    response_class=StreamingResponse,
    responses={200: {"content": {DICOM: _BINARY}}},
)
async def download_file(
    payload_id: Identifier, sop_instance_uid: Uid, objects: ObjectsDep
) -> StreamingResponse:
    """One file of the payload, streamed as stored."""
    files = await _payload_files(objects, payload_id)
    file = next((f for f in files if f.sop_instance_uid == sop_instance_uid), None)
    if file is None:
        raise NotFound(f"payload {payload_id} has no instance {sop_instance_uid}")
    return StreamingResponse(
        await _primed(objects.stream(file.key)),
        media_type=DICOM,
        headers={"Content-Length": str(file.size), **_attachment(f"{sop_instance_uid}.dcm")},
    )


@router.get(
    "/{payload_id}/archive",
    dependencies=GATEWAY_READ,
    response_class=StreamingResponse,
    responses={200: {"content": {"application/x-tar": _BINARY}}},
)
async def download_archive(payload_id: Identifier, objects: ObjectsDep) -> StreamingResponse:
    """Every file of the payload in one streamed tar archive."""
    files = await _payload_files(objects, payload_id)
    return StreamingResponse(
        tar_stream(objects, files),
        media_type="application/x-tar",
        headers=_attachment(f"{payload_id}.tar"),
    )


async def tar_stream(objects: ObjectStore, files: list[StoredFile]) -> AsyncIterator[bytes]:
    """A POSIX (pax) tar of ``files``, named by their key below ``payloads/``, built as it is sent."""
    mtime = time.time()
    for file in files:
        info = tarfile.TarInfo(file.key.removeprefix(PAYLOADS))
        info.size, info.mtime, info.mode = file.size, mtime, 0o644
        yield info.tobuf(tarfile.PAX_FORMAT)
        sent = 0
        async for chunk in objects.stream(file.key):
            sent += len(chunk)
            yield chunk
        if sent != file.size:  # the archive would be corrupt: break the response off instead
            raise RuntimeError(f"{file.key} changed size while archived ({file.size} -> {sent} bytes)")
        yield b"\0" * (-file.size % TAR_BLOCK)
    yield b"\0" * (2 * TAR_BLOCK)


async def _payload_files(objects: ObjectStore, payload_id: str) -> list[StoredFile]:
    files = [stored for ref in await objects.list(payload_prefix(payload_id)) if (stored := _stored(ref))]
    if not files:
        raise NotFound(f"payload {payload_id} not found")
    return files


def _stored(ref: FileRef) -> StoredFile | None:
    """The file at ``ref`` with the UIDs its key holds; None for a key outside the payload layout."""
    parts = ref.key.split("/")
    if len(parts) != 5 or not parts[4].endswith(".dcm"):
        return None
    study, series, sop = parts[2], parts[3], parts[4].removesuffix(".dcm")
    try:
        return StoredFile(
            key=ref.key,
            size=ref.size,
            study_instance_uid=study,
            series_instance_uid=series,
            sop_instance_uid=sop,
        )
    except ValidationError:
        return None


async def _primed(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """Fetch the first chunk now, so a missing object or a store outage is a problem, not a cut stream."""
    first = await anext(chunks, b"")

    async def replay() -> AsyncIterator[bytes]:
        yield first
        async for chunk in chunks:
            yield chunk

    return replay()


def _attachment(filename: str) -> dict[str, str]:
    return {"Content-Disposition": f'attachment; filename="{filename}"'}
