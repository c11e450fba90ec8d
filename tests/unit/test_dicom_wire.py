"""The fast C-STORE sender's bytes against pynetdicom's: the same association request, the same P-DATA for
a C-STORE, the same reading of responses, rejections and aborts.

A scripted acceptor in this process (PDUs encoded by pynetdicom's own classes) answers both senders in
turn: pynetdicom's lane (`ExecutorLane`, its blocking calls in a thread) and the wire lane (`WireLane`),
and records what each sent.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import struct
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from pynetdicom.dimse_messages import C_STORE_RQ, C_STORE_RSP
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode, split_dataset
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RJ, A_ASSOCIATE_RQ, A_RELEASE_RP, P_DATA_TF
from pynetdicom.pdu_primitives import A_ASSOCIATE, MaximumLengthNotification
from pynetdicom.presentation import build_context
from pynetdicom.transport import AssociationSocket

from devkit.dicom import write_ct_study
from schemas.applications import DicomSinkArgs
from schemas.events import FileExportResult, FileRef
from wm.config import ExportSettings
from wm.sinks.dicom_lanes import ExecutorLane, LocalFile, SendLane
from wm.sinks.dicom_pdus import (
    COMMAND,
    LAST,
    ProtocolError,
    accepted_contexts,
    associate_request,
    command_values,
    p_data,
    store_command,
)
from wm.sinks.dicom_wire import WireLane

CT = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
SUCCESS, COERCED, OUT_OF_RESOURCES, CANNOT_UNDERSTAND = 0x0000, 0xB000, 0xA700, 0xC000


@dataclass
class Script:
    """What the scripted acceptor does: its maximum PDU, the status it answers, or a rejection or an
    abort (after the command set); what it received (every P-DATA-TF, its bytes, per connection)."""

    max_pdu: int = 16384
    status: int = SUCCESS
    reject: bool = False
    abort_after_command: bool = False
    accept_none: bool = False
    requests: list[bytes] = field(default_factory=list)
    p_data: list[bytes] = field(default_factory=list)


async def read_pdu(reader: asyncio.StreamReader) -> bytes:
    header = await reader.readexactly(6)
    return header + await reader.readexactly(struct.unpack(">L", header[2:])[0])


def answer(request: bytes, script: Script) -> bytes:
    """pynetdicom's A-ASSOCIATE-AC accepting every proposed context (or its -RJ when told to reject)."""
    proposal = A_ASSOCIATE_RQ()
    proposal.decode(request)
    pdu = proposal.to_primitive()
    primitive = A_ASSOCIATE()
    primitive.application_context_name = pdu.application_context_name
    primitive.calling_ae_title, primitive.called_ae_title = pdu.calling_ae_title, pdu.called_ae_title
    if script.reject:
        primitive.result, primitive.result_source, primitive.diagnostic = 0x01, 0x01, 0x07
        rejected = A_ASSOCIATE_RJ()
        rejected.from_primitive(primitive)
        return rejected.encode()
    primitive.result, primitive.result_source = 0x00, 0x01
    contexts = []
    for proposed in pdu.presentation_context_definition_list:
        context = build_context(str(proposed.abstract_syntax), [str(proposed.transfer_syntax[0])])
        context.context_id, context.result = proposed.context_id, 0x03 if script.accept_none else 0x00
        contexts.append(context)
    primitive.presentation_context_definition_results_list = contexts
    maximum = MaximumLengthNotification()
    maximum.maximum_length_received = script.max_pdu
    primitive.user_information = [maximum, *pdu.user_information[1:]]
    accepted = A_ASSOCIATE_AC()
    accepted.from_primitive(primitive)
    return accepted.encode()


def store_response(command: bytes, status: int) -> bytes:
    """pynetdicom's C-STORE-RSP P-DATA-TF to the C-STORE-RQ ``command``, with an Error Comment on failure."""
    values = command_values(command)
    primitive = C_STORE()
    primitive.MessageIDBeingRespondedTo = int.from_bytes(values[0x0110], "little")
    primitive.AffectedSOPClassUID = values[0x0002].rstrip(b"\0").decode()
    primitive.AffectedSOPInstanceUID = values[0x1000].rstrip(b"\0").decode()
    primitive.Status = status
    message = C_STORE_RSP()
    message.primitive_to_message(primitive)
    if status != SUCCESS:
        message.command_set.ErrorComment = "scripted"
    [pdata] = message.encode_msg(1, 16384)
    return P_DATA_TF(pdata).encode()


async def serve(script: Script, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    request = await read_pdu(reader)
    script.requests.append(request)
    writer.write(answer(request, script))
    command = b""
    while not script.reject:
        pdu = await read_pdu(reader)
        if pdu[0] == 0x05:  # A-RELEASE-RQ
            writer.write(A_RELEASE_RP().encode())
            break
        if pdu[0] != 0x04:  # an A-ABORT
            break
        script.p_data.append(pdu)
        control = pdu[11]
        if control & COMMAND:
            command += pdu[12:]
            if script.abort_after_command:
                writer.write(b"\x07\x00\x00\x00\x00\x04\x00\x00\x02\x00")  # A-ABORT, service provider
                break
        elif control & LAST:
            writer.write(store_response(command, script.status))
            command = b""
    await writer.drain()
    writer.close()


@pytest.fixture
async def peer() -> AsyncIterator[tuple[Script, DicomSinkArgs]]:
    script = Script()
    server = await asyncio.start_server(lambda r, w: serve(script, r, w), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        yield script, DicomSinkArgs(ae_title="SCRIPTED", host="127.0.0.1", port=port)


def local_files(directory: Path, slices: int, rows: int) -> list[LocalFile]:
    study = write_ct_study(directory, slices_per_series=slices, rows=rows, columns=rows + 1)
    files = []
    for path in study.files:
        meta, offset = split_dataset(path)
        files.append(
            LocalFile(
                FileRef(bucket="bucket", key=path.name, size=path.stat().st_size),
                path,
                sop_class_uid=str(meta.MediaStorageSOPClassUID),
                transfer_syntax_uid=str(meta.TransferSyntaxUID),
                sop_instance_uid=str(meta.MediaStorageSOPInstanceUID),
                dataset_offset=offset,
            )
        )
    return files


async def send(lane: SendLane, files: list[LocalFile]) -> tuple[bool, str, list[FileExportResult]]:
    """Associate, C-STORE ``files``, release: (rejected, problem, results)."""
    try:
        opened = await lane.open([(CT, EXPLICIT_LE)])
        results = await lane.store_all(files, 0) if opened.established else []
        await lane.release()
        return opened.rejected, opened.problem, results
    finally:
        lane.close()


def lanes(args: DicomSinkArgs) -> tuple[SendLane, SendLane]:
    settings = ExportSettings(acse_timeout_s=5, dimse_timeout_s=5)
    return ExecutorLane(args, settings), WireLane(args, settings)


async def same_outcome(
    args: DicomSinkArgs, files: list[LocalFile]
) -> tuple[bool, str, list[FileExportResult]]:
    """`send` through pynetdicom's lane, then the wire lane: the wire lane's outcome, checked the same."""
    pynetdicom_outcome, wire_outcome = [await send(lane, files) for lane in lanes(args)]
    assert wire_outcome == pynetdicom_outcome
    return wire_outcome


async def test_the_association_request_is_pynetdicoms(
    peer: tuple[Script, DicomSinkArgs], tmp_path: Path
) -> None:
    script, args = peer
    for lane in lanes(args):
        await send(lane, [])
    pynetdicom_request, wire_request = script.requests
    assert wire_request == pynetdicom_request
    assert associate_request("MWM", "SCRIPTED", [(CT, EXPLICIT_LE)]) == wire_request


@pytest.mark.parametrize("max_pdu", [16384, 4096, 131072, 0])
async def test_a_c_store_is_the_bytes_pynetdicom_sends(
    peer: tuple[Script, DicomSinkArgs], tmp_path: Path, max_pdu: int
) -> None:
    script, args = peer
    script.max_pdu = max_pdu
    files = local_files(tmp_path, slices=3, rows=37)  # 37x38 pixels: not a whole number of fragments
    sent = []
    for lane in lanes(args):
        script.p_data.clear()
        assert await send(lane, files) == (
            False,
            "",
            [FileExportResult(key=f.ref.key, status="succeeded") for f in files],
        )
        sent.append(list(script.p_data))
    pynetdicom_pdus, wire_pdus = sent
    assert len(wire_pdus) >= 6 and wire_pdus == pynetdicom_pdus


@pytest.mark.parametrize("status", [COERCED, OUT_OF_RESOURCES, CANNOT_UNDERSTAND])
async def test_statuses_give_the_same_results_as_pynetdicoms_lane(
    peer: tuple[Script, DicomSinkArgs], tmp_path: Path, status: int
) -> None:
    script, args = peer
    script.status = status
    files = local_files(tmp_path, slices=2, rows=8)
    wire_outcome = await same_outcome(args, files)
    succeeded = status == COERCED
    assert {result.status for result in wire_outcome[2]} == {"succeeded" if succeeded else "failed"}
    if not succeeded:
        assert wire_outcome[2][0].error == f"C-STORE status 0x{status:04X} (Failure)"


async def test_a_rejection_reads_as_pynetdicoms(peer: tuple[Script, DicomSinkArgs], tmp_path: Path) -> None:
    script, args = peer
    script.reject = True
    wire_outcome = await same_outcome(args, [])
    assert (
        wire_outcome[0]
        and "Rejected Permanent, Service User: Called AE title not recognised" in wire_outcome[1]
    )


class LateWake(threading.Event):
    """An event whose waiter resumes 0.2 s after it is set, as a thread starved of the CPU would."""

    def wait(self, timeout: float | None = None) -> bool:
        woke = super().wait(timeout)
        time.sleep(0.2)
        return woke


async def test_a_rejection_is_one_even_when_pynetdicom_wakes_late(
    peer: tuple[Script, DicomSinkArgs], monkeypatch: pytest.MonkeyPatch
) -> None:
    # pynetdicom's association thread waits on the socket's _ready for the DUL thread's connect; when it
    # wakes after the DUL thread read the A-ASSOCIATE-RJ and closed, it aborts and is_rejected stays False
    # (seen under load in the whole unit suite; see wm.pynetdicom_patches.record_rejections).
    script, args = peer
    script.reject = True
    create = AssociationSocket.__init__

    def with_late_wake(socket: AssociationSocket, *args: Any, **kwargs: Any) -> None:
        create(socket, *args, **kwargs)
        socket._ready = LateWake()

    monkeypatch.setattr(AssociationSocket, "__init__", with_late_wake)
    rejected, problem, _ = await send(ExecutorLane(args, ExportSettings(acse_timeout_s=5)), [])
    assert rejected and problem.endswith("Rejected Permanent, Service User: Called AE title not recognised")


async def test_no_accepted_context_is_no_association_as_with_pynetdicom(
    peer: tuple[Script, DicomSinkArgs], tmp_path: Path
) -> None:
    script, args = peer
    script.accept_none = True
    wire_outcome = await same_outcome(args, [])
    assert (
        wire_outcome[1]
        == f"no association with SCRIPTED@127.0.0.1:{args.port} (refused, aborted or timed out)"
    )


async def test_an_abort_mid_send_leaves_the_file_to_send_again(
    peer: tuple[Script, DicomSinkArgs], tmp_path: Path
) -> None:
    script, args = peer
    script.abort_after_command = True
    files = local_files(tmp_path, slices=2, rows=256)
    assert await same_outcome(args, files) == (False, "", [])


def test_command_set_and_fragments_match_pynetdicoms_encoder(tmp_path: Path) -> None:
    request = C_STORE()
    request.MessageID, request.Priority = 65535, 2
    request.AffectedSOPClassUID, request.AffectedSOPInstanceUID = CT, "1.2.3.4.5.67"
    request._dataset_path = (tmp_path / "unread.dcm", 0)  # CommandDataSetType: a data set follows
    message = C_STORE_RQ()
    message.primitive_to_message(request)
    command = store_command(CT, "1.2.3.4.5.67", 65535)
    assert command == encode(message.command_set, True, True)
    for fragment in (10, 4090, len(command) + 6):
        pdus = itertools.islice(message.encode_msg(5, fragment + 6), math.ceil(len(command) / fragment))
        expected = [P_DATA_TF(pdata).encode() for pdata in pdus]
        framed = b"".join(p_data(5, COMMAND, command, fragment))
        assert framed == b"".join(expected)


def test_a_malformed_answer_is_a_protocol_error() -> None:
    with pytest.raises(ProtocolError):
        # an A-ASSOCIATE-AC whose presentation context item runs past its end (pynetdicom asserts)
        truncated = b"\x02\x00\x00\x00\x00\x50\x00\x01" + b"\x00" * 66 + b"\x21\x00\x00\x08\x01"
        accepted_contexts([(CT, EXPLICIT_LE)], truncated)
    with pytest.raises(ProtocolError):
        command_values(b"\x00\x00\x00\x00\xff\x00\x00\x00")  # a value longer than the command
