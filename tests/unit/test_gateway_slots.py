"""The spool's reusable slot files: what a restart finds in them, and how they are reused and freed."""

from __future__ import annotations

import gc
import json
from pathlib import Path

import pytest

from devkit.dicom import write_ct_study
from producers.gateway_slots import KEEP_MAX_BYTES, PREAMBLE, SLOT_BYTES, Slots, SlotWriter, open_slot
from producers.gateway_spool import SessionInfo, Spool
from schemas.events import DicomIdentifiers
from wm.dicom import read_identifiers
from wm.dicom_encoding import inspect_file

PAYLOAD = "0123456789abcdef0123456789abcdef"


@pytest.fixture
def dicom_file(tmp_path: Path) -> bytes:
    return (
        write_ct_study(tmp_path / "study", slices_per_series=1, rows=32, columns=32, seed=7)
        .files[0]
        .read_bytes()
    )


@pytest.fixture
def slots(tmp_path: Path) -> Slots:
    pool = Slots(tmp_path / "spool" / "slots", tmp_path / "spool" / "incoming")
    pool.scan()
    return pool


def receive(slots: Slots, data: bytes) -> SlotWriter:
    """Write ``data`` as pynetdicom does: the zero preamble, then the rest in fragments."""
    writer = slots.take()
    writer.write(b"\x00" * PREAMBLE)
    for start in range(PREAMBLE, len(data), 1000):
        writer.write(data[start : start + 1000])
    writer.file.flush()
    return writer


def test_a_sealed_file_is_found_after_a_restart_and_reads_back_as_it_was_received(
    slots: Slots, dicom_file: bytes
) -> None:
    writer = receive(slots, dicom_file)
    writer.seal(sequence=7, payload_id=PAYLOAD)
    writer.close()

    [(path, record)] = Slots(slots.directory, slots.directory).scan()

    assert (path, record.length, record.sequence, record.payload_id) == (
        writer.path,
        len(dicom_file),
        7,
        PAYLOAD,
    )
    with open_slot(path, record.length) as stream:
        assert stream.read() == bytes(PREAMBLE) + dicom_file[PREAMBLE:]
    with open_slot(path, record.length) as stream:
        assert read_identifiers(stream).sop_instance_uid


def test_a_slot_rewritten_but_not_sealed_is_free_after_a_restart(slots: Slots, dicom_file: bytes) -> None:
    writer = receive(slots, dicom_file)
    writer.seal(sequence=1, payload_id=PAYLOAD)
    writer.close()
    with open(writer.path, "r+b") as stream:  # a crash while the next file overwrote it: the old record stays
        stream.seek(PREAMBLE + 10)
        stream.write(b"another file's bytes")

    assert Slots(slots.directory, slots.directory).scan() == []


def test_a_released_slot_is_reused_without_its_old_record(slots: Slots, dicom_file: bytes) -> None:
    writer = receive(slots, dicom_file)
    writer.seal(sequence=1, payload_id=PAYLOAD)
    writer.close()

    slots.release(writer.path)

    assert Slots(slots.directory, slots.directory).scan() == []
    again = slots.take()
    assert (again.path, again.fresh, slots.count) == (writer.path, False, 1)
    again.close()


def test_a_refused_or_abandoned_receive_gives_its_slot_back(slots: Slots, dicom_file: bytes) -> None:
    refused = receive(slots, dicom_file)
    abandoned = receive(slots, dicom_file[:500])
    abandoned_path = abandoned.path
    refused.close()  # pynetdicom closes the file after the handler answered a failure
    del abandoned  # the association ended mid data set: pynetdicom drops the file unclosed
    gc.collect()

    taken = {slots.take().path, slots.take().path}

    assert taken == {refused.path, abandoned_path}
    assert slots.count == 2


def test_pynetdicom_deletes_a_throwaway_name_never_the_slot(slots: Slots, dicom_file: bytes) -> None:
    writer = receive(slots, dicom_file)

    assert Path(writer.name) != writer.path
    assert not Path(writer.name).exists()
    writer.close()


def test_preallocation_writes_what_is_missing_once(slots: Slots) -> None:
    assert slots.preallocate(3) == 3
    assert slots.preallocate(3) == 0
    assert sorted(path.stat().st_size for path in slots.directory.iterdir()) == [SLOT_BYTES] * 3
    assert not slots.take().fresh


def test_a_slot_grown_by_a_large_file_is_deleted_when_released(slots: Slots) -> None:
    writer = slots.take()
    writer.write(bytes(KEEP_MAX_BYTES + 1))
    writer.seal(sequence=1, payload_id=PAYLOAD)
    writer.close()

    slots.release(writer.path)

    assert not writer.path.exists()
    assert slots.count == 0


def test_only_the_received_length_is_inspected_not_an_older_files_tail(
    slots: Slots, dicom_file: bytes
) -> None:
    longer = receive(slots, dicom_file + bytes(5000))
    longer.seal(sequence=1, payload_id=PAYLOAD)
    longer.close()
    slots.release(longer.path)
    cut = receive(slots, dicom_file[:-1000])  # pixel data cut short, into the same slot
    assert cut.path == longer.path

    assert inspect_file(cut.path, size=cut.length).problem is not None
    assert inspect_file(cut.path).problem is None  # the whole slot: the old tail hides the cut
    cut.close()


def test_recovery_resumes_recorded_sessions_and_frees_slots_whose_session_is_gone(
    tmp_path: Path, dicom_file: bytes
) -> None:
    spool = Spool(tmp_path / "spool", 10**9)
    spool.recover()
    session = SessionInfo(PAYLOAD, "CT", "MWM", "127.0.0.1:1")
    spool.save_session(session)
    kept = spool.accept(receive(spool.slots, dicom_file), session, read_ids(dicom_file, tmp_path))
    orphan = receive(spool.slots, dicom_file)
    orphan.seal(sequence=99, payload_id="f" * 32)  # its session's files were all sent, its record removed

    restarted = Spool(tmp_path / "spool", 10**9)
    [item] = restarted.recover()

    assert (item.path, item.size, item.ids) == (kept.path, len(dicom_file), kept.ids)
    assert item.session.state == "aborted"  # its association was open when the gateway stopped
    assert json.loads((tmp_path / "spool" / PAYLOAD / "session.json").read_text())["state"] == "aborted"
    assert restarted.slots.take().path == orphan.path


def read_ids(data: bytes, tmp_path: Path) -> DicomIdentifiers:
    path = tmp_path / "file.dcm"
    path.write_bytes(data)
    return read_identifiers(path)
