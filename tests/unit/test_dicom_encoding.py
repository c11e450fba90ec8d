"""`wm.dicom_encoding`: an incomplete encoding is found wherever the file was cut, a complete one passes; the
same walk reads the identifiers pydicom reads; the gateway's receive patches keep pynetdicom's contract."""

from __future__ import annotations

import copy
import socket
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pydicom.sequence import Sequence
from pydicom.uid import (
    UID,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
)
from pynetdicom.dsutils import create_file_meta
from pynetdicom.transport import AssociationSocket

from devkit.dicom import write_ct_study
from producers.gateway_ae import application_entity
from wm import pynetdicom_patches
from wm.config import Settings
from wm.dicom import IDENTIFIER_TAGS, InvalidDicom, identifiers_from_raw, read_identifiers
from wm.dicom_encoding import encoding_problem, inspect_file
from wm.pynetdicom_patches import (
    PREALLOCATED_PDU_BYTES,
    UnsupportedPynetdicom,
    check_version,
    copy_contexts_cheaply,
    file_meta_bytes,
    read_whole_pdus,
)


@pytest.fixture
def ct_file(tmp_path: Path) -> Path:
    return write_ct_study(tmp_path / "s", series=1, slices_per_series=1, rows=32, columns=32, seed=5).files[0]


def cut(path: Path, drop: int, target: Path) -> Path:
    target.write_bytes(path.read_bytes()[:-drop])
    return target


def test_a_complete_file_has_no_problem(ct_file: Path) -> None:
    assert encoding_problem(ct_file) is None


@pytest.mark.parametrize("drop", [1, 1000, 2040])
def test_truncated_pixel_data_is_found(ct_file: Path, tmp_path: Path, drop: int) -> None:
    problem = encoding_problem(cut(ct_file, drop, tmp_path / "cut.dcm"))
    assert problem is not None and problem.startswith("element (7FE0,0010)"), problem


def test_a_file_cut_inside_an_element_header_is_found(ct_file: Path, tmp_path: Path) -> None:
    size = ct_file.stat().st_size
    pixels = 32 * 32 * 2
    problem = encoding_problem(cut(ct_file, pixels + 6, tmp_path / "cut.dcm"))  # 6 of 12 header bytes left
    assert problem is not None and "cut short" in problem and str(size - pixels - 6) in problem


@pytest.mark.parametrize("syntax", [ImplicitVRLittleEndian, ExplicitVRBigEndian])
def test_other_syntaxes_and_undefined_length_sequences(ct_file: Path, tmp_path: Path, syntax: str) -> None:
    dataset = Dataset(pydicom.dcmread(ct_file))  # a plain Dataset: FileDataset keeps its original endianness
    dataset.file_meta = pydicom.dcmread(ct_file).file_meta
    item = Dataset()
    item.CodeValue = "123"
    dataset.ReferencedImageSequence = Sequence([item])
    dataset["ReferencedImageSequence"].is_undefined_length = True
    dataset.file_meta.TransferSyntaxUID = pydicom.uid.UID(syntax)
    path = tmp_path / "other.dcm"
    pydicom.dcmwrite(path, dataset, enforce_file_format=True)  # encoded as its transfer syntax says
    assert encoding_problem(path) is None
    assert encoding_problem(cut(path, 100, tmp_path / "cut.dcm")) is not None


def test_encapsulated_pixel_data_cut_in_a_fragment_is_found(ct_file: Path, tmp_path: Path) -> None:
    dataset = pydicom.dcmread(ct_file)
    dataset.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    dataset.PixelData = encapsulate([b"\xff\xd8" + b"\x00" * 500 + b"\xff\xd9"])
    dataset["PixelData"].is_undefined_length = True
    dataset["PixelData"].VR = "OB"
    path = tmp_path / "encapsulated.dcm"
    dataset.save_as(path)
    assert encoding_problem(path) is None
    problem = encoding_problem(cut(path, 300, tmp_path / "cut.dcm"))
    assert problem is not None and "(FFFE,E000)" in problem, problem
    no_delimiter = encoding_problem(cut(path, 8, tmp_path / "nodelimiter.dcm"))
    assert no_delimiter is not None and "cut short" in no_delimiter, no_delimiter


def test_the_pynetdicom_patches_refuse_a_version_they_were_not_written_for() -> None:
    check_version("3.0.4")
    for version in ("2.1.1", "3.1.0", "4.0.0"):
        with pytest.raises(UnsupportedPynetdicom, match=version):
            check_version(version)


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian])
def test_one_walk_reads_the_same_identifiers_as_pydicom(ct_file: Path, tmp_path: Path, syntax: str) -> None:
    dataset = Dataset(pydicom.dcmread(ct_file))
    dataset.file_meta = pydicom.dcmread(ct_file).file_meta
    dataset.file_meta.TransferSyntaxUID = pydicom.uid.UID(syntax)
    item = Dataset()
    item.SOPInstanceUID = "1.2.3.999"  # inside a sequence: not the file's own identifier
    dataset.ReferencedImageSequence = Sequence([item])
    path = tmp_path / "ids.dcm"
    pydicom.dcmwrite(path, dataset, enforce_file_format=True)
    inspection = inspect_file(path, IDENTIFIER_TAGS)
    assert inspection.problem is None and inspection.walked
    assert identifiers_from_raw(inspection.values) == read_identifiers(path)


def test_raw_identifiers_name_what_is_missing(ct_file: Path) -> None:
    values = inspect_file(ct_file, IDENTIFIER_TAGS).values
    del values[0x0020000E]
    with pytest.raises(InvalidDicom, match=r"DICOM header lacks SeriesInstanceUID$"):
        identifiers_from_raw(values)


def test_a_deflated_data_set_is_not_walked(ct_file: Path, tmp_path: Path) -> None:
    dataset = pydicom.dcmread(ct_file)
    dataset.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    path = tmp_path / "deflated.dcm"
    dataset.save_as(path)
    assert inspect_file(path, IDENTIFIER_TAGS).walked is False


def test_the_direct_file_meta_is_pynetdicoms_byte_for_byte() -> None:
    for instance in ("1.2.826.0.1.3680043.8.498.1", "1.2.826.0.1.3680043.8.498.12"):  # odd and even length
        uids = {
            "sop_class_uid": CTImageStorage,
            "sop_instance_uid": instance,
            "transfer_syntax": JPEGBaseline8Bit,
        }
        expected = DicomBytesIO()
        write_file_meta_info(expected, create_file_meta(**{key: UID(value) for key, value in uids.items()}))
        assert file_meta_bytes(**uids) == expected.getvalue()


@pytest.mark.parametrize("preallocated", [PREALLOCATED_PDU_BYTES, 1000])
def test_a_pdu_is_read_whole_across_partial_sends(monkeypatch: pytest.MonkeyPatch, preallocated: int) -> None:
    monkeypatch.setattr(pynetdicom_patches, "PREALLOCATED_PDU_BYTES", preallocated)
    monkeypatch.setattr(AssociationSocket, "recv", AssociationSocket.recv)  # restored after the test
    read_whole_pdus()
    payload = bytes(range(256)) * 40
    ours, peer = socket.socketpair()
    with ours, peer:
        connection: Any = SimpleNamespace(socket=ours)

        def send_in_pieces() -> None:
            for start in range(0, len(payload), 999):
                peer.sendall(payload[start : start + 999])

        sender = threading.Thread(target=send_in_pieces)
        sender.start()
        assert AssociationSocket.recv(connection, len(payload)) == payload
        sender.join()
        peer.sendall(payload[:100])
        peer.shutdown(socket.SHUT_WR)  # the peer goes away mid-PDU: what arrived is returned
        assert AssociationSocket.recv(connection, len(payload)) == payload[:100]


def test_the_cheap_context_copy_is_as_independent_as_a_deep_copy() -> None:
    server: Any = SimpleNamespace(contexts=application_entity(Settings().gateway).supported_contexts)
    copy_contexts_cheaply(server)
    copies = copy.deepcopy(server.contexts)
    assert [(c.abstract_syntax, c.transfer_syntax) for c in copies] == [
        (c.abstract_syntax, c.transfer_syntax) for c in server.contexts
    ]
    copies[0].context_id, copies[0].result = 1, 0
    copies[0].transfer_syntax = [ExplicitVRLittleEndian]
    copies[1]._transfer_syntax.clear()  # what negotiation may change: the copy, never the server's
    assert server.contexts[0].context_id is None and server.contexts[0].result is None
    assert len(server.contexts[0].transfer_syntax) > 1 and server.contexts[1].transfer_syntax
