"""The DICOM upper layer PDUs and C-STORE command sets the wire sender (`wm.sinks.dicom_wire`) needs.

Pure functions on bytes (PS3.8 9.3, PS3.7 9.3.1, E). The association PDUs are encoded and decoded with
pynetdicom's own PDU classes (once per association); the P-DATA framing and the C-STORE command sets
(implicit VR little endian, group 0000 with its group length) are packed and read with ``struct``, per
file: pydicom's ``write_dataset`` took about 0.2 ms a command, as long as sending the file's PDUs. The unit
tests compare every one of them byte for byte with what pynetdicom sends and decodes.
"""

from __future__ import annotations

import contextlib
import struct
from collections.abc import Iterator

from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION, build_context
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RJ, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
)

Pair = tuple[str, str]
"""(SOP class UID, transfer syntax UID): one presentation context."""

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
"""The DICOM application context name (PS3.7 A.2.1)."""
OWN_MAX_PDU = 16382
"""The largest P-DATA PDU we accept (pynetdicom's default): only responses come our way."""
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


class ProtocolError(ValueError):
    """Bytes from the peer that are not what the protocol allows here."""


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
    with _malformed("A-ASSOCIATE-AC"):
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
    with _malformed("A-ASSOCIATE-RJ"):
        answer.decode(pdu)
        primitive = answer.to_primitive()
    return f"{primitive.result_str}, {primitive.source_str}: {primitive.reason_str}"


@contextlib.contextmanager
def _malformed(what: str) -> Iterator[None]:
    """pynetdicom's decoders fail on bad bytes with assertions, slicing or struct errors: a ProtocolError."""
    try:
        yield
    except (AssertionError, ValueError, IndexError, KeyError, TypeError, struct.error) as exc:
        raise ProtocolError(f"malformed {what}: {exc!r}") from exc


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
            raise ProtocolError(f"not a command set (element ({group:04X},{element:04X}))")
        values[element] = command[offset : offset + length]
        offset += length
    return values


def fragment_size(max_pdu: int) -> int:
    """Data bytes per P-DATA-TF for a peer's maximum PDU length: its PDV list holds one item of a 4-byte
    length, a context ID and a control header besides the data (PS3.8 9.3.5)."""
    return max_pdu - 6 if max_pdu else UNLIMITED_FRAGMENT


def p_data(
    context_id: int, control: int, data: bytes | memoryview, fragment: int, last: bool = True
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


def command_fragments(pdu: bytes, fragments: list[bytes]) -> bool:
    """Append a P-DATA-TF's command fragments to ``fragments``; whether the command's last one came."""
    offset, done = PDU_HEADER.size, False
    while offset < len(pdu):
        (length,) = struct.unpack_from(">L", pdu, offset)
        control = pdu[offset + 5]
        if length < 2 or not control & COMMAND or done:
            raise ProtocolError("a C-STORE response must be one command, with no data set")
        fragments.append(pdu[offset + 6 : offset + 4 + length])
        done = bool(control & LAST)
        offset += 4 + length
    return done
