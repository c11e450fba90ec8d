"""Reading an upload's files from the request body as it streams in, one temporary file per part.

`spooled_parts` accepts ``application/dicom`` (the body is one file), ``multipart/related`` (with no
``type`` or ``type="application/dicom"``: the DICOMweb STOW shape) and ``multipart/form-data``; every part
of a multipart body is a file (options go in the query string). Anything else is refused with 415, a
multipart type without a ``boundary`` with 400.

The body is read chunk by chunk (``request.stream()``) and each part is written to a
``SpooledTemporaryFile`` that moves to disk beyond `SPOOL_MAX_BYTES`; a part is handed to the caller as
soon as it is complete, and the next chunk is read only after the caller is done with it, so memory stays
at one chunk plus one small part whatever the file sizes (and a slow object store slows the sender down).
A body that ends in the middle of a part, or is not valid multipart, ends the iteration with a
`BrokenBody` naming the part where it broke.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from tempfile import SpooledTemporaryFile
from typing import TYPE_CHECKING

from fastapi import HTTPException, Request
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect

if TYPE_CHECKING:
    from python_multipart.multipart import MultipartCallbacks

SPOOL_MAX_BYTES = 1024 * 1024
"""A part larger than this is spooled to a temporary file on disk instead of memory."""

DICOM = "application/dicom"
MULTIPART_TYPES = ("multipart/related", "multipart/form-data")
ACCEPTED = f'{DICOM}, multipart/related; type="{DICOM}" or multipart/form-data'


class SpooledPart:
    """One file of an upload, in a temporary file (memory while small). Close it when done."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.size = 0
        self.file: SpooledTemporaryFile[bytes] = SpooledTemporaryFile(  # noqa: SIM115 - see close()
            max_size=SPOOL_MAX_BYTES
        )

    async def write(self, data: bytes) -> None:
        """Append ``data``; in a worker thread once the part lives on disk."""
        if self.size + len(data) > SPOOL_MAX_BYTES:
            await asyncio.to_thread(self.file.write, data)
        else:
            self.file.write(data)
        self.size += len(data)

    def close(self) -> None:
        """Release the temporary file."""
        self.file.close()


@dataclass
class BrokenBody:
    """The body ended early or is malformed at part ``index`` (the parts before it were complete)."""

    index: int
    error: str


@dataclass
class _Collector:
    """python-multipart callbacks: the order of part boundaries and data, to replay asynchronously."""

    writes: list[tuple[SpooledPart, bytes]] = field(default_factory=list)
    done: list[SpooledPart] = field(default_factory=list)
    current: SpooledPart | None = None
    count: int = 0
    ended: bool = False

    def callbacks(self) -> MultipartCallbacks:
        return {
            "on_part_begin": self._begin,
            "on_part_data": self._data,
            "on_part_end": self._end,
            "on_end": self._finished,
        }

    def _begin(self) -> None:
        self.current = SpooledPart(self.count)
        self.count += 1

    def _data(self, data: bytes, start: int, end: int) -> None:
        assert self.current is not None
        self.writes.append((self.current, data[start:end]))

    def _end(self) -> None:
        assert self.current is not None
        self.done.append(self.current)
        self.current = None

    def _finished(self) -> None:
        self.ended = True

    @property
    def position(self) -> int:
        """The index of the part being read (or of the next one between parts)."""
        return self.count - 1 if self.current is not None else self.count

    async def flush(self) -> list[SpooledPart]:
        """Write what the last chunk carried; returns the parts it completed."""
        writes, self.writes = self.writes, []
        for part, data in writes:
            await part.write(data)
        done, self.done = self.done, []
        return done

    def discard(self) -> None:
        """Close the parts not handed out (the iteration stopped early)."""
        for part in [*self.done, *([self.current] if self.current else [])]:
            part.close()


def multipart_boundary(content_type: str | None) -> bytes | None:
    """The boundary of a multipart upload, None for a single ``application/dicom`` file; else 415/400."""
    media_type, options = parse_options_header(content_type)
    kind = media_type.decode("latin-1")
    if kind == DICOM:
        return None
    related_type = options.get(b"type", DICOM.encode()).decode("latin-1").lower()
    if kind not in MULTIPART_TYPES or (kind == "multipart/related" and related_type != DICOM):
        raise HTTPException(415, f"unsupported content type {content_type!r}; send {ACCEPTED}")
    boundary = options.get(b"boundary")
    if not boundary:
        raise HTTPException(400, f"{kind} without a boundary parameter")
    return boundary


async def spooled_parts(request: Request) -> AsyncGenerator[SpooledPart | BrokenBody, None]:
    """The upload's files in request order, each complete before it is yielded (see the module doc)."""
    boundary = multipart_boundary(request.headers.get("content-type"))
    try:
        if boundary is None:
            yield await _whole_body(request)
        else:
            async for part in _multipart(request, boundary):
                yield part
    except ClientDisconnect as exc:
        raise HTTPException(400, "the client disconnected during the upload") from exc


async def _whole_body(request: Request) -> SpooledPart:
    part = SpooledPart(0)
    try:
        async for chunk in request.stream():
            await part.write(chunk)
    except BaseException:
        part.close()
        raise
    return part


async def _multipart(request: Request, boundary: bytes) -> AsyncGenerator[SpooledPart | BrokenBody, None]:
    collector = _Collector()
    parser = MultipartParser(boundary, collector.callbacks())
    try:
        async for chunk in request.stream():
            error = _feed(parser, chunk)
            for part in await collector.flush():
                yield part
            if error is not None:
                yield BrokenBody(collector.position, f"malformed multipart body: {error}")
                return
    finally:
        collector.discard()
    if not collector.ended:
        yield BrokenBody(collector.position, "the body ended before the closing boundary")


def _feed(parser: MultipartParser, chunk: bytes) -> str | None:
    """Parse one chunk; the parse error, if any (the callbacks ran up to it)."""
    try:
        parser.write(chunk)
    except MultipartParseError as exc:
        return str(exc)
    return None
