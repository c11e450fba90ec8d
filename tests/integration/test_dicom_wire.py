"""The wire sender (``export.sender = "wire"``) against independent receivers: dcmtk ``storescp`` and Orthanc.

The sink runs in this process (``DicomSink.export``) on the real object store. The study mixes what an
application may write: CT slices in explicit VR little endian, one slice in implicit VR little endian, and
instances of storage classes outside the sink's common list (sent over a second association proposing
exactly their pairs). Each receiver must store every file unchanged: storescp in bit-preserving mode (``+B``)
writes the data set bytes exactly as they came, so they are compared byte for byte with the originals;
Orthanc's copies are compared by SOP Instance UID and pixel data.
"""

from __future__ import annotations

import io
import uuid
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import UID, ImplicitVRLittleEndian
from pynetdicom.dsutils import split_dataset

from devkit.dicom import write_ct_study
from devkit.peers import LOCALHOST, Orthanc, StoreSCP
from schemas.applications import SinkDefinition
from schemas.events import FileRef
from wm.adapters.objectstore import ObjectStore
from wm.config import Settings
from wm.sinks import DestinationUnavailable
from wm.sinks.dicom import DicomSink, DicomSinkSettings

UNCOMMON = (UID("1.2.840.10008.5.1.4.1.1.6.1"), UID("1.2.840.10008.5.1.4.1.1.20"))
"""Ultrasound and Nuclear Medicine Image Storage: not among the sink's common classes. Whichever file
arrives first sets the first association's classes, so at least one of them goes over a second one."""


def wire_settings(settings: Settings, **values: object) -> Settings:
    export = settings.export.model_copy(update={"sender": "wire"} | values)
    return settings.model_copy(update={"export": export})


def sink(settings: Settings, objects: ObjectStore, aet: str, port: int) -> DicomSink:
    args = {"ae_title": aet, "host": LOCALHOST, "port": port, "max_associations": 2}
    definition = SinkDefinition.model_validate({"name": "pacs", "type": "dicom", "args": args})
    return DicomSink(definition, DicomSinkSettings.of(settings), objects)


def mixed_study(directory: Path) -> list[Path]:
    """CT slices (explicit VR little endian), the second rewritten in implicit VR little endian, the third
    and fourth made `UNCOMMON` instances."""
    files = write_ct_study(
        directory, slices_per_series=12, rows=128, columns=96, seed=uuid.uuid4().int % 10**6
    )
    implicit = pydicom.dcmread(files.files[1])
    implicit.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    implicit.save_as(files.files[1], implicit_vr=True, little_endian=True)
    for path, sop_class in zip(files.files[2:4], UNCOMMON, strict=True):
        other = pydicom.dcmread(path)
        other.SOPClassUID = other.file_meta.MediaStorageSOPClassUID = sop_class
        other.save_as(path)
    return files.files


async def put(objects: ObjectStore, files: list[Path]) -> list[FileRef]:
    return [await objects.put_file(f"jobs/j/outputs/{path.parent.name}-{path.name}", path) for path in files]


def dataset_bytes(path: Path) -> tuple[str, bytes]:
    """A file's SOP Instance UID and its data set bytes after the file meta."""
    meta, offset = split_dataset(path)
    return str(meta.MediaStorageSOPInstanceUID), path.read_bytes()[offset:]


@pytest.mark.parametrize(
    ("max_pdu", "in_memory"),
    [(4096, "all"), (16384, "all"), (16384, "none"), (16384, "some"), (131072, "all")],
)
async def test_storescp_stores_every_file_bit_for_bit(
    live_settings: Settings, tmp_path: Path, max_pdu: int, in_memory: str
) -> None:
    """Whether a file is held in memory between download and send (``in_memory``: every file, none, or
    the smaller half) changes nothing the receiver sees."""
    files = mixed_study(tmp_path / "study")
    median_size = sorted(path.stat().st_size for path in files)[len(files) // 2]
    limit = {"all": 1 << 30, "none": 0, "some": median_size}[in_memory]
    settings = wire_settings(live_settings, in_memory_max_bytes=limit)
    async with ObjectStore(settings.object_store) as objects:
        refs = await put(objects, files)
        scp_args = ["--fork", "--max-pdu", str(max_pdu)]
        async with StoreSCP(tmp_path / "scp", aet="WIRESCP", bit_preserving=True, extra_args=scp_args) as scp:
            results = (await sink(settings, objects, "WIRESCP", scp.port).export(refs)).results
            received = scp.received_files()
            log = scp.log()
    assert [result.status for result in results] == ["succeeded"] * len(files), results
    assert dict(map(dataset_bytes, received)) == dict(map(dataset_bytes, files))
    assert log.count("Association Acknowledged") == 2, log  # the study, then the uncommon class(es)


async def test_a_fetch_holds_a_file_in_memory_only_when_asked_to(
    live_settings: Settings, tmp_path: Path
) -> None:
    path = mixed_study(tmp_path / "study")[0]
    size = path.stat().st_size
    async with ObjectStore(live_settings.object_store) as objects:
        [ref] = await put(objects, [path])
        asked: list[int] = []

        def hold_any(size: int) -> bool:
            asked.append(size)
            return True

        held = await objects.fetch(ref.key, tmp_path / "held.dcm", hold_any)
        written = await objects.fetch(ref.key, tmp_path / "written.dcm", lambda length: False)
    assert asked == [size]
    assert held == path.read_bytes()
    assert not (tmp_path / "held.dcm").exists()
    assert written is None
    assert (tmp_path / "written.dcm").read_bytes() == path.read_bytes()


async def test_orthanc_stores_every_file_with_identical_pixels(
    live_settings: Settings, tmp_path: Path
) -> None:
    settings = wire_settings(live_settings)
    files = mixed_study(tmp_path / "study")
    originals = [pydicom.dcmread(path) for path in files]
    async with ObjectStore(settings.object_store) as objects:
        refs = await put(objects, files)
        with Orthanc(aet="WIREORTHANC") as orthanc:
            results = (await sink(settings, objects, "WIREORTHANC", orthanc.dicom_port).export(refs)).results
            stored = [pydicom.dcmread(io.BytesIO(orthanc.get_file(i))) for i in orthanc.instances()]
    assert [result.status for result in results] == ["succeeded"] * len(files), results
    by_uid = {str(ds.SOPInstanceUID): (str(ds.SOPClassUID), bytes(ds.PixelData)) for ds in stored}
    assert by_uid == {str(ds.SOPInstanceUID): (str(ds.SOPClassUID), bytes(ds.PixelData)) for ds in originals}


@pytest.mark.parametrize("sender", ["wire", "pynetdicom"])
async def test_a_peer_aborting_during_a_data_set_is_retried_then_left_to_a_redelivery(
    live_settings: Settings, tmp_path: Path, sender: str
) -> None:
    settings = wire_settings(live_settings, sender=sender, retry_attempts=2, retry_initial_delay_s=0.1)
    files = write_ct_study(tmp_path / "study", slices_per_series=3, rows=256, columns=256).files
    async with ObjectStore(settings.object_store) as objects:
        refs = await put(objects, files)
        async with StoreSCP(tmp_path / "scp", aet="WIRESCP", extra_args=["--abort-during"]) as scp:
            with pytest.raises(DestinationUnavailable) as raised:
                await sink(settings, objects, "WIRESCP", scp.port).export(refs)
            log = scp.log()
    assert "gave up after 2 attempts" in raised.value.reason
    assert raised.value.results == [], "every file goes again with the redelivery"
    assert log.count("Association Acknowledged") == 2, log
