"""The DICOM sink's senders on the real object store and dcmtk ``storescp`` as the peer: the wire sender
on the event loop (``export.sender = "wire"``, the default) and pynetdicom's from worker processes
(``export.send_processes``) or threads; every case gives the same results with each.

The sink runs in this process (``DicomSink.export``); the files are generated CT slices put in the test's
own bucket, plus a key missing from the store and an object that is not DICOM.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pydicom
import pytest

from devkit.dicom import write_ct_study
from devkit.peers import LOCALHOST, StoreSCP
from schemas.applications import SinkDefinition
from schemas.events import FileExportResult, FileRef
from wm.adapters.objectstore import ObjectStore
from wm.config import Settings
from wm.sinks import DestinationUnavailable
from wm.sinks.dicom import DicomSink, DicomSinkSettings
from wm.sinks.dicom_lanes import lane_executor

SCP_AET = "PROCSCP"
MODES = [
    pytest.param(("wire", False), id="wire"),
    pytest.param(("pynetdicom", True), id="processes"),
    pytest.param(("pynetdicom", False), id="threads"),
]


def export_settings(settings: Settings, mode: tuple[str, bool], **values: object) -> Settings:
    """Two associations for any study of 8 files or more, with the ``mode``'s sender (and processes)."""
    sender, send_processes = mode
    lanes = {"associations_per_task": 2, "files_per_association": 4}
    export = settings.export.model_copy(
        update={"sender": sender, "send_processes": send_processes} | lanes | values
    )
    return settings.model_copy(update={"export": export})


def sink(settings: Settings, objects: ObjectStore, port: int) -> DicomSink:
    args = {"ae_title": SCP_AET, "host": LOCALHOST, "port": port, "max_associations": 2}
    definition = SinkDefinition.model_validate({"name": "pacs", "type": "dicom", "args": args})
    return DicomSink(definition, DicomSinkSettings.of(settings), objects)


async def study_with_bad_files(objects: ObjectStore, directory: Path, slices: int) -> list[FileRef]:
    """``slices`` CT files in the store, then a key that is not there and an object that is not DICOM."""
    study = write_ct_study(directory, slices_per_series=slices, seed=int(uuid.uuid4().int % 10**6))
    refs = [await objects.put_file(f"jobs/j/outputs/{path.name}", path) for path in study.files]
    garbage = directory.parent / "garbage.dcm"
    garbage.write_bytes(b"not DICOM at all" * 64)
    refs.append(await objects.put_file("jobs/j/outputs/garbage.dcm", garbage))
    refs.append(FileRef(bucket=objects.bucket, key="jobs/j/outputs/missing.dcm", size=1))
    return refs


def by_name(results: list[FileExportResult]) -> dict[str, FileExportResult]:
    return {result.key.rsplit("/", 1)[-1]: result for result in results}


def test_a_lane_process_is_another_process() -> None:
    with lane_executor(True) as worker:
        assert worker.submit(os.getpid).result(timeout=60) != os.getpid()


@pytest.mark.parametrize("mode", MODES)
async def test_every_file_gets_its_own_result_over_two_associations(
    live_settings: Settings, tmp_path: Path, mode: tuple[str, bool]
) -> None:
    settings = export_settings(live_settings, mode)
    async with ObjectStore(settings.object_store) as objects:
        refs = await study_with_bad_files(objects, tmp_path / "study", slices=20)
        async with StoreSCP(tmp_path / "scp", aet=SCP_AET, extra_args=["--fork"]) as scp:
            results = (await sink(settings, objects, scp.port).export(refs)).results
            received = [pydicom.dcmread(path) for path in scp.received_files()]
            log = scp.log()
    outcome = by_name(results)
    assert [result.key for result in results] == [ref.key for ref in refs], "one result per file, in order"
    missing, garbage = outcome.pop("missing.dcm"), outcome.pop("garbage.dcm")
    assert missing.status == "failed" and "not found" in (missing.error or "")
    assert garbage.status == "failed" and "not a DICOM file" in (garbage.error or "")
    assert {result.status for result in outcome.values()} == {"succeeded"} and len(outcome) == 20
    originals = {str(pydicom.dcmread(path).SOPInstanceUID) for path in (tmp_path / "study").rglob("*.dcm")}
    assert len(received) == 20 and {str(ds.SOPInstanceUID) for ds in received} == originals
    assert log.count("Association Acknowledged") == 2, log


@pytest.mark.parametrize("mode", MODES)
async def test_a_pacs_that_refuses_fails_every_file_at_once(
    live_settings: Settings, tmp_path: Path, mode: tuple[str, bool]
) -> None:
    settings = export_settings(live_settings, mode, retry_attempts=5, retry_initial_delay_s=30.0)
    async with ObjectStore(settings.object_store) as objects:
        refs = await study_with_bad_files(objects, tmp_path / "study", slices=12)
        # --fork: each lane's request gets its own A-ASSOCIATE-RJ (storescp serving one at a time may drop
        # the second connection unanswered, which is transient and retried).
        async with StoreSCP(tmp_path / "scp", aet=SCP_AET, refuse=True, extra_args=["--fork"]) as scp:
            results = (await sink(settings, objects, scp.port).export(refs)).results
            log = scp.log()
    outcome = by_name(results)
    assert outcome.pop("missing.dcm").status == outcome.pop("garbage.dcm").status == "failed"
    assert len(outcome) == 12
    for result in outcome.values():
        assert result.status == "failed" and "association rejected" in (result.error or ""), result
    # No retry (it would wait 30 s first): at most one attempt per lane. storescp refuses the readiness
    # probe of StoreSCP (a bare TCP connect) too, and its forked child may log that late: at most three.
    assert 1 <= log.count("Refusing Association") <= 3, log


@pytest.mark.parametrize("mode", MODES)
async def test_a_peer_that_aborts_is_retried_then_left_to_a_redelivery(
    live_settings: Settings, tmp_path: Path, mode: tuple[str, bool]
) -> None:
    settings = export_settings(live_settings, mode, retry_attempts=2, retry_initial_delay_s=0.1)
    async with ObjectStore(settings.object_store) as objects:
        refs = await study_with_bad_files(objects, tmp_path / "study", slices=10)
        async with StoreSCP(tmp_path / "scp", aet=SCP_AET, extra_args=["--fork", "--abort-after"]) as scp:
            with pytest.raises(DestinationUnavailable) as raised:
                await sink(settings, objects, scp.port).export(refs)
            log = scp.log()
    # The destination stays unavailable through the sink's short retries: the exporter will send the
    # slices again later (a delayed redelivery); only the files' own verdicts are kept as final.
    assert "gave up after 2 attempts" in raised.value.reason
    kept = by_name(raised.value.results)
    assert set(kept) <= {"missing.dcm", "garbage.dcm"}, kept
    assert all(result.status == "failed" for result in kept.values())
    # The lane holding files tries twice; the other lane too, unless it found the feed empty (the first
    # lane took every waiting file in one batch) and ended after its first association.
    assert log.count("Association Acknowledged") in (3, 4), log
