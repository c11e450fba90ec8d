"""The DICOM sink's fast C-STORE SCU: the DICOM upper layer on asyncio, sending files' stored bytes as is.

Why: pynetdicom spends about 2.2 s of CPU sending the 324-slice CT (about 10,000 P-DATA PDUs at dcmtk's
16 KB, each through its DUL state machine, queues between its threads and per-PDU Python). Here the
exporter's event loop writes each file itself: its data set is read from the downloaded file in large
chunks and written in max-PDU fragments, packing only a 12-byte header per PDU (one ``bytes.join`` and one
transport write per chunk). No thread per association, so several associations share the loop with the
downloads.

What it speaks (PS3.8 9.3, PS3.7 9.3.1): A-ASSOCIATE-RQ/AC/RJ, P-DATA-TF, A-RELEASE-RQ/RP, A-ABORT;
C-STORE-RQ and C-STORE-RSP, one request outstanding at a time (no asynchronous operations window is
proposed). The association PDUs are encoded and decoded with pynetdicom's own PDU classes (once per
association); the P-DATA framing and the C-STORE command sets (implicit VR little endian, group 0000 with
its group length; packed and read with ``struct``, per file) are written here, and the unit tests compare
them byte for byte with what pynetdicom sends and decodes. A file goes only over a presentation context
whose transfer syntax is its own: never converted. No TLS (the sink has none).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import Iterator
from pathlib import Path

from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION, build_context
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RJ, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
)

from schemas.applications import DicomSinkArgs
from schemas.events import FileExportResult
from wm.config import ExportSettings
from wm.sinks.dicom_lanes import MAX_MESSAGE_ID, LocalFile, Opened, store_result

Pair = tuple[str, str]

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
"""The DICOM application context name (PS3.7 A.2.1)."""
OWN_MAX_PDU = 16382
"""The largest P-DATA PDU we accept (pynetdicom's default): only responses come our way."""
LARGEST_INCOMING = 1 << 20
"""A PDU from the peer longer than this is a protocol error (an A-ASSOCIATE-AC with 128 contexts is
about 10 KB)."""
CHUNK_BYTES = 4 << 20
"""Data set bytes read from the file and written at once (rounded down to whole fragments)."""
UNLIMITED_FRAGMENT = 1 << 20
"""Fragment size when the peer sets no maximum PDU length (0): any size goes, this bounds one PDU."""

ASSOCIATE_AC, ASSOCIATE_RJ, P_DATA_TF, RELEASE_RQ, RELEASE_RP, ABORT = 0x02, 0x03, 0x04, 0x05, 0x06, 0x07
"""PDU types (PS3.8 9.3.1)."""
COMMAND, LAST = 0x01, 0x02
"""Message control header bits (PS3.8 E.2): a command fragment; the last fragment of its part."""
C_STORE_RQ, C_STORE_RSP = 0x0001, 0x8001
"""Command Field values (PS3.7 E.1)."""
DATASET_PRESENT = 0x0001
"""Command Data Set Type: a data set follows (any value but 0x0101)."""
PRIORITY_LOW = 0x0002
"""Priority: what pynetdicom's ``send_c_store`` sends by default."""
COMMAND_FIELD, MESSAGE_ID_RESPONDED_TO, STATUS = 0x0100, 0x0120, 0x0900
"""Elements of a C-STORE-RSP the sink reads (group 0000)."""
COMMAND_ELEMENT = struct.Struct("<HHL")
"""A command element's tag (group, element) and value length: implicit VR little endian."""
PDU_HEADER = struct.Struct(">BxL")
P_DATA_HEADER = struct.Struct(">BxLLBB")
"""A P-DATA-TF with one PDV: type, PDU length, PDV item length, presentation context ID, control header."""
RELEASE_REQUEST = struct.pack(">BxLL", RELEASE_RQ, 4, 0)
ABORT_REQUEST = struct.pack(">BxLxxBB", ABORT, 4, 0, 0)
"""A-ABORT from the service user, no reason (PS3.8 9.3.8)."""


class AssociationLost(Exception):
    """The association is gone: aborted, closed, timed out, or the peer broke the protocol."""


class AssociationRejected(Exception):
    """The peer answered the A-ASSOCIATE-RQ with an A-ASSOCIATE-RJ; the message is its result and reason."""


def associate_request(
    calling_ae: str, called_ae: str, pairs: list[Pair], max_pdu: int = OWN_MAX_PDU
) -> bytes:
    """The A-ASSOCIATE-RQ proposing one context per (SOP class, transfer syntax) pair, IDs 1, 3, 5, ...

    The same user information as pynetdicom's ``AE.associate``: maximum length, its implementation class
    UID and version name.
    """
    primitive = A_ASSOCIATE()
    primitive.application_context_name = APPLICATION_CONTEXT
    primitive.calling_ae_title = calling_ae
    primitive.called_ae_title = called_ae
    contexts = [build_context(sop_class, [syntax]) for sop_class, syntax in pairs]
    for index, context in enumerate(contexts):
        context.context_id = 2 * index + 1
    primitive.presentation_context_definition_list = contexts
    maximum = MaximumLengthNotification()
    maximum.maximum_length_received = max_pdu
    implementation = ImplementationClassUIDNotification()
    implementation.implementation_class_uid = PYNETDICOM_IMPLEMENTATION_UID
    version = ImplementationVersionNameNotification()
    version.implementation_version_name = PYNETDICOM_IMPLEMENTATION_VERSION
    primitive.user_information = [maximum, implementation, version]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(primitive)
    return pdu.encode()


def accepted_contexts(pairs: list[Pair], pdu: bytes) -> tuple[dict[Pair, int], int]:
    """From an A-ASSOCIATE-AC answering `associate_request` (``pairs``): the accepted pairs with their
    context IDs, and the peer's maximum PDU length (0: no limit)."""
    answer = A_ASSOCIATE_AC()
    answer.decode(pdu)
    primitive = answer.to_primitive()
    proposed = {2 * index + 1: pair for index, pair in enumerate(pairs)}
    accepted: dict[Pair, int] = {}
    for context in primitive.presentation_context_definition_results_list:
        pair = proposed.get(context.context_id or 0)
        if pair and context.result == 0 and [str(uid) for uid in context.transfer_syntax] == [pair[1]]:
            accepted[pair] = context.context_id or 0
    return accepted, primitive.maximum_length_received or 0


def rejection(pdu: bytes) -> str:
    """An A-ASSOCIATE-RJ's result, source and reason, worded as pynetdicom words them."""
    answer = A_ASSOCIATE_RJ()
    answer.decode(pdu)
    primitive = answer.to_primitive()
    return f"{primitive.result_str}, {primitive.source_str}: {primitive.reason_str}"


def store_command(sop_class: str, sop_instance: str, message_id: int) -> bytes:
    """The C-STORE-RQ command set, implicit VR little endian, with its group length (PS3.7 9.3.1.1).

    Packed by hand: pydicom's ``write_dataset`` took about 0.2 ms a file, as much as sending the file's
    PDUs; the unit tests check these bytes against pydicom's and pynetdicom's encoding.
    """
    elements = b"".join(
        (
            _element(0x0002, _uid(sop_class)),  # Affected SOP Class UID
            _element(0x0100, C_STORE_RQ.to_bytes(2, "little")),  # Command Field
            _element(0x0110, message_id.to_bytes(2, "little")),  # Message ID
            _element(0x0700, PRIORITY_LOW.to_bytes(2, "little")),  # Priority
            _element(0x0800, DATASET_PRESENT.to_bytes(2, "little")),  # Command Data Set Type
            _element(0x1000, _uid(sop_instance)),  # Affected SOP Instance UID
        )
    )
    return _element(0x0000, len(elements).to_bytes(4, "little")) + elements  # Command Group Length


def _element(element: int, value: bytes) -> bytes:
    """A group 0000 element in implicit VR little endian: tag, 4-byte length, value."""
    return COMMAND_ELEMENT.pack(0x0000, element, len(value)) + value


def _uid(uid: str) -> bytes:
    """A UI value: ASCII, padded with a NUL to an even length (PS3.5 6.2)."""
    value = uid.encode("ascii")
    return value + b"\0" if len(value) % 2 else value


def command_values(command: bytes) -> dict[int, bytes]:
    """The values of a command set's elements by element number (group 0000, implicit VR little endian)."""
    values: dict[int, bytes] = {}
    offset = 0
    while offset + COMMAND_ELEMENT.size <= len(command):
        group, element, length = COMMAND_ELEMENT.unpack_from(command, offset)
        offset += COMMAND_ELEMENT.size
        if group != 0x0000 or offset + length > len(command):
            raise AssociationLost(f"not a command set (element ({group:04X},{element:04X}))")
        values[element] = command[offset : offset + length]
        offset += length
    return values


def fragment_size(max_pdu: int) -> int:
    """Data bytes per P-DATA-TF for a peer's maximum PDU length: its PDV list holds one item of a 4-byte
    length, a context ID and a control header besides the data (PS3.8 9.3.5)."""
    return max_pdu - 6 if max_pdu else UNLIMITED_FRAGMENT


def p_data(
    context_id: int, control: int, data: bytes, fragment: int, last: bool = True
) -> Iterator[bytes | memoryview]:
    """P-DATA-TF PDUs carrying ``data`` in fragments of ``fragment`` bytes: header and fragment in turn.

    ``control`` says command or data set; the last fragment also gets the last-fragment bit when ``last``
    (a data set sent in several chunks is one part). Empty ``data`` is one empty fragment.
    """
    view = memoryview(data)
    ends = range(fragment, len(view) + fragment, fragment) if view else (0,)
    start = 0
    for end in ends:
        piece = view[start:end]
        flags = control | (LAST if last and end >= len(view) else 0)
        yield P_DATA_HEADER.pack(P_DATA_TF, len(piece) + 6, len(piece) + 2, context_id, flags)
        yield piece
        start = end


def read_at(path: Path, position: int, size: int) -> tuple[int, bytes]:
    """The file's size and up to ``size`` bytes of it from ``position`` (run in a thread)."""
    with path.open("rb") as handle:
        handle.seek(position)
        return path.stat().st_size, handle.read(size)


class WireAssociation:
    """An established association: C-STOREs one at a time, then a release (or an abort on any error)."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        accepted: dict[Pair, int],
        max_pdu: int,
        settings: ExportSettings,
    ) -> None:
        self.reader, self.writer = reader, writer
        self.accepted = accepted
        self.fragment = fragment_size(max_pdu)
        self.settings = settings

    @classmethod
    async def request(
        cls, args: DicomSinkArgs, settings: ExportSettings, pairs: list[Pair]
    ) -> WireAssociation:
        """Connect and associate. `AssociationRejected` on an A-ASSOCIATE-RJ, `AssociationLost` on any other
        failure (refused, timed out, aborted, not an answer)."""
        try:
            async with asyncio.timeout(settings.acse_timeout_s):
                reader, writer = await asyncio.open_connection(args.host, args.port)
        except (OSError, TimeoutError) as exc:
            raise AssociationLost(f"cannot connect: {exc!r}") from exc
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # no C-STORE waits on a delayed ACK
        association = cls(reader, writer, {}, 0, settings)
        try:
            writer.write(associate_request(args.calling_ae_title, args.ae_title, pairs))
            kind, pdu = await association._acse_answer()
            if kind == ASSOCIATE_RJ:
                raise AssociationRejected(rejection(pdu))
            if kind != ASSOCIATE_AC:
                raise AssociationLost(f"answered with PDU type 0x{kind:02X}")
            accepted, max_pdu = accepted_contexts(pairs, pdu)
        except BaseException:
            association.abort()
            raise
        association.accepted, association.fragment = accepted, fragment_size(max_pdu)
        return association

    async def store(self, file: LocalFile, message_id: int) -> int:
        """C-STORE ``file`` over its own (SOP class, transfer syntax) context: the response's status.

        `KeyError` when no such context was accepted; `AssociationLost` (after an abort) when the
        association fails before the response.
        """
        context_id = self.accepted[(file.sop_class_uid, file.transfer_syntax_uid)]
        try:
            command = store_command(file.sop_class_uid, file.sop_instance_uid, message_id)
            self.writer.write(b"".join(p_data(context_id, COMMAND, command, self.fragment)))
            await self._send_dataset(file, context_id)
            return await self._status(message_id)
        except AssociationLost:
            self.abort()
            raise
        except (OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
            self.abort()
            raise AssociationLost(repr(exc)) from exc

    async def _send_dataset(self, file: LocalFile, context_id: int) -> None:
        """The file's data set bytes after its meta, a chunk at a time; the next chunk is read while the
        transport sends the last one."""
        chunk = max(1, CHUNK_BYTES // self.fragment) * self.fragment
        size, data = await asyncio.to_thread(read_at, file.path, file.dataset_offset, chunk)
        position = file.dataset_offset + len(data)
        while True:
            last = position >= size
            self.writer.write(b"".join(p_data(context_id, 0, data, self.fragment, last)))
            if last:
                return
            _, data = await asyncio.to_thread(read_at, file.path, position, chunk)
            if not data:
                raise OSError(f"{file.path} shrank while it was sent")
            position += len(data)
            async with asyncio.timeout(self.settings.dimse_timeout_s):
                await self.writer.drain()

    async def _status(self, message_id: int) -> int:
        """Read the C-STORE-RSP to ``message_id``: its Status."""
        fragments: list[bytes] = []
        async with asyncio.timeout(self.settings.dimse_timeout_s):
            await self.writer.drain()
            while True:
                kind, pdu = await self._read_pdu()
                if kind != P_DATA_TF:
                    raise AssociationLost(f"PDU type 0x{kind:02X} instead of a C-STORE response")
                if _command_fragments(pdu, fragments):
                    break
        response = command_values(b"".join(fragments))
        status = response.get(STATUS, b"")
        if (
            response.get(COMMAND_FIELD) != C_STORE_RSP.to_bytes(2, "little")
            or response.get(MESSAGE_ID_RESPONDED_TO) != message_id.to_bytes(2, "little")
            or len(status) != 2
        ):
            raise AssociationLost(f"not the C-STORE response to message {message_id}")
        return int.from_bytes(status, "little")

    async def release(self) -> None:
        """A-RELEASE-RQ, wait for the A-RELEASE-RP, close; an abort instead when that fails."""
        try:
            self.writer.write(RELEASE_REQUEST)
            kind, _ = await self._acse_answer()
            if kind != RELEASE_RP:
                raise AssociationLost(f"PDU type 0x{kind:02X} instead of A-RELEASE-RP")
        except (AssociationLost, OSError, TimeoutError, asyncio.IncompleteReadError):
            self.abort()
            return
        self.writer.close()

    def abort(self) -> None:
        """Send an A-ABORT (when the connection still takes it) and close the connection."""
        with contextlib.suppress(OSError, RuntimeError):
            if not self.writer.is_closing():
                self.writer.write(ABORT_REQUEST)
        self.writer.close()

    async def _acse_answer(self) -> tuple[int, bytes]:
        """The next PDU within the ACSE timeout; an A-ABORT from the peer is `AssociationLost`."""
        async with asyncio.timeout(self.settings.acse_timeout_s):
            kind, pdu = await self._read_pdu()
        return kind, pdu

    async def _read_pdu(self) -> tuple[int, bytes]:
        """The next PDU: its type and its bytes (header included, as pynetdicom's decoders take them)."""
        header = await self.reader.readexactly(PDU_HEADER.size)
        kind, length = PDU_HEADER.unpack(header)
        if length > LARGEST_INCOMING:
            raise AssociationLost(f"PDU type 0x{kind:02X} of {length} bytes")
        pdu = header + await self.reader.readexactly(length)
        if kind == ABORT:
            raise AssociationLost("aborted by the peer (A-ABORT)")
        return kind, pdu


def _command_fragments(pdu: bytes, fragments: list[bytes]) -> bool:
    """Append a P-DATA-TF's command fragments to ``fragments``; whether the command's last one came."""
    offset, done = PDU_HEADER.size, False
    while offset < len(pdu):
        (length,) = struct.unpack_from(">L", pdu, offset)
        control = pdu[offset + 5]
        if length < 2 or not control & COMMAND or done:
            raise AssociationLost("a C-STORE response must be one command, with no data set")
        fragments.append(pdu[offset + 6 : offset + 4 + length])
        done = bool(control & LAST)
        offset += 4 + length
    return done


class WireLane:
    """A `wm.sinks.dicom_lanes.SendLane` on `WireAssociation`: runs on the exporter's event loop."""

    def __init__(self, args: DicomSinkArgs, settings: ExportSettings) -> None:
        self.args, self.settings = args, settings
        self.association: WireAssociation | None = None
        self.destination = f"{args.ae_title}@{args.host}:{args.port}"

    async def open(self, pairs: list[Pair]) -> Opened:
        """See `SendLane.open`: the same outcomes, and words, as pynetdicom's lane."""
        await self.release()
        try:
            self.association = await WireAssociation.request(self.args, self.settings, pairs)
        except AssociationRejected as exc:
            return Opened(problem=f"association rejected by {self.destination}: {exc}", rejected=True)
        except AssociationLost:
            return Opened(problem=f"no association with {self.destination} (refused, aborted or timed out)")
        return Opened(frozenset(self.association.accepted))

    async def store_all(self, files: list[LocalFile], first_id: int) -> list[FileExportResult]:
        """See `SendLane.store_all`."""
        results: list[FileExportResult] = []
        for offset, file in enumerate(files):
            if self.association is None:
                break
            try:
                status = await self.association.store(file, (first_id + offset) % MAX_MESSAGE_ID + 1)
            except KeyError:
                pair = (file.sop_class_uid, file.transfer_syntax_uid)
                error = f"not sent: no accepted presentation context for {pair}"
                results.append(FileExportResult(key=file.ref.key, status="failed", error=error))
                continue
            except AssociationLost:
                self.association = None
                break
            results.append(store_result(file.ref.key, status))
        return results

    async def release(self) -> None:
        """See `SendLane.release`."""
        association, self.association = self.association, None
        if association is not None:
            await association.release()

    def close(self) -> None:
        """See `SendLane.close`: an association still held (a cancelled export) is aborted."""
        association, self.association = self.association, None
        if association is not None:
            association.abort()
