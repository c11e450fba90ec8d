"""The real DICOM peers (dcmtk storescu/storescp, Orthanc 1.10) driven by devkit.peers.

These tests never skip: a missing dcmtk or Orthanc fails them with PeerUnavailableError, whose message says
which Debian package to install.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterable, Iterator
from io import BytesIO
from pathlib import Path

import httpx
import pydicom
import pytest

from devkit.dicom import GeneratedStudy, write_corrupt_file, write_ct_study
from devkit.peers import (
    LOCALHOST,
    Orthanc,
    StoreSCP,
    astorescu,
    dcmtk_tool,
    free_port,
    orthanc_binary,
    storescu,
)

pytestmark = pytest.mark.integration


def _pixels_by_sop_uid(files: Iterable[Path]) -> dict[str, bytes]:
    result: dict[str, bytes] = {}
    for path in files:
        ds = pydicom.dcmread(path)
        result[str(ds.SOPInstanceUID)] = bytes(ds.PixelData)
    return result


def _assert_delivered(study: GeneratedStudy, received: list[Path]) -> None:
    """Every generated instance arrived exactly once, with identical pixel data and UIDs."""
    assert len(received) == len(study.files)
    sent = _pixels_by_sop_uid(study.files)
    got = _pixels_by_sop_uid(received)
    assert got.keys() == sent.keys()
    for uid, pixels in sent.items():
        assert got[uid] == pixels, f"pixel data of {uid} differs"
    for path in received:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        assert ds.StudyInstanceUID == study.study_uid
        assert ds.SeriesInstanceUID in study.series_uids


@pytest.fixture
def study(tmp_path: Path) -> GeneratedStudy:
    return write_ct_study(tmp_path / "study", series=2, slices_per_series=3, rows=64, columns=64, seed=11)


@pytest.fixture(scope="module")
def orthanc_server() -> Iterator[Orthanc]:
    """One Orthanc for the module: its clean shutdown takes about 3 s."""
    with Orthanc(aet="MWMORTHANC") as server:
        yield server


@pytest.fixture
def orthanc(orthanc_server: Orthanc) -> Orthanc:
    """The module's Orthanc, emptied."""
    orthanc_server.delete_all()
    assert orthanc_server.instance_count() == 0
    return orthanc_server


def test_peer_binaries_are_installed() -> None:
    for tool in ("storescp", "storescu", "dcmdump"):
        assert Path(dcmtk_tool(tool)).is_file()
    version = subprocess.run([orthanc_binary(), "--version"], capture_output=True, text=True, check=True)
    assert "Orthanc" in version.stdout


def test_free_port_is_bindable() -> None:
    port = free_port()
    assert 1024 <= port <= 65535


def test_storescu_to_storescp_delivers_identical_pixels(tmp_path: Path, study: GeneratedStudy) -> None:
    with StoreSCP(tmp_path / "received", aet="MWMSCP") as scp:
        result = storescu(LOCALHOST, scp.port, "MWMSCP", study.files[0].parent.parent, calling_aet="MWMTEST")
        assert result.returncode == 0, result.stderr
        received = scp.wait_for_files(len(study.files))
        assert "Received Store Request" in scp.log()
    assert not scp.running
    _assert_delivered(study, received)


async def test_astorescu_to_async_storescp(tmp_path: Path, study: GeneratedStudy) -> None:
    async with StoreSCP(tmp_path / "received", aet="ASYNCSCP") as scp:
        result = await astorescu(LOCALHOST, scp.port, "ASYNCSCP", study.files, timeout=60)
        assert result.returncode == 0, result.stderr
        received = await scp.await_files(len(study.files), timeout=10)
    _assert_delivered(study, received)


def test_refused_association_makes_storescu_fail(tmp_path: Path, study: GeneratedStudy) -> None:
    with StoreSCP(tmp_path / "received", aet="REFUSER", refuse=True) as scp:
        result = storescu(LOCALHOST, scp.port, "REFUSER", study.files[:1])
        assert result.returncode != 0
        assert "Association Rejected" in result.stdout + result.stderr
        with pytest.raises(subprocess.CalledProcessError):
            storescu(LOCALHOST, scp.port, "REFUSER", study.files[:1], check=True)
        assert scp.received_files() == []


async def test_astorescu_reports_refusal(tmp_path: Path, study: GeneratedStudy) -> None:
    async with StoreSCP(tmp_path / "received", aet="REFUSER", refuse=True) as scp:
        result = await astorescu(LOCALHOST, scp.port, "REFUSER", study.files[:1])
    assert result.returncode != 0


def test_dcmtk_also_rejects_the_corrupt_file(tmp_path: Path) -> None:
    bad = write_corrupt_file(tmp_path / "bad.dcm")
    result = subprocess.run([dcmtk_tool("dcmdump"), str(bad)], capture_output=True, text=True)
    assert result.returncode != 0


def test_storescu_to_orthanc_then_export_to_storescp(
    tmp_path: Path, study: GeneratedStudy, orthanc: Orthanc
) -> None:
    with StoreSCP(tmp_path / "exported", aet="EXPORTSCP") as scp:
        result = storescu(LOCALHOST, orthanc.dicom_port, orthanc.aet, study.files)
        assert result.returncode == 0, result.stderr
        assert orthanc.instance_count() == len(study.files)
        assert len(orthanc.instances()) == len(study.files)
        [study_id] = orthanc.studies()

        stored = pydicom.dcmread(BytesIO(orthanc.get_file(orthanc.instances()[0])))
        assert stored.StudyInstanceUID == study.study_uid
        assert orthanc.instance_tags(orthanc.instances()[0])["StudyInstanceUID"] == study.study_uid

        orthanc.set_modality("export", scp.aet, LOCALHOST, scp.port)
        assert "export" in orthanc.modality_names()
        assert orthanc.echo("export")
        summary = orthanc.store_to_modality("export", [study_id])
        assert summary["InstancesCount"] == len(study.files)
        assert summary["FailedInstancesCount"] == 0
        received = scp.wait_for_files(len(study.files))
    _assert_delivered(study, received)


def test_orthanc_configured_modality_and_asynchronous_export(tmp_path: Path, study: GeneratedStudy) -> None:
    with (
        StoreSCP(tmp_path / "exported", aet="JOBSCP") as scp,
        Orthanc(modalities={"dest": ("JOBSCP", LOCALHOST, scp.port)}) as server,
    ):
        for path in study.files:
            assert server.upload(path)["Status"] == "Success"
        assert server.modality_names() == ["dest"]
        job = server.store_to_modality("dest", server.instances(), synchronous=False)
        assert server.wait_job(job["ID"])["State"] == "Success"
        received = scp.wait_for_files(len(study.files))
        workdir = server.workdir
        assert "Orthanc has started" in server.log()
    assert not workdir.exists()
    _assert_delivered(study, received)


def test_orthanc_export_to_refusing_modality_fails(
    study: GeneratedStudy, orthanc: Orthanc, tmp_path: Path
) -> None:
    orthanc.upload(study.files[0])
    with StoreSCP(tmp_path / "received", aet="REFUSER", refuse=True) as scp:
        orthanc.set_modality("refuser", scp.aet, LOCALHOST, scp.port)
        with pytest.raises(httpx.HTTPStatusError):
            orthanc.store_to_modality("refuser", orthanc.instances())
        assert scp.received_files() == []


def test_orthanc_delete_all(study: GeneratedStudy, orthanc: Orthanc) -> None:
    for path in study.files:
        orthanc.upload(path)
    assert orthanc.instance_count() == len(study.files)
    orthanc.delete_all()
    assert orthanc.instance_count() == 0
    assert orthanc.instances() == []
