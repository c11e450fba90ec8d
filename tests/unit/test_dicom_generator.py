"""The synthetic DICOM generator (devkit.dicom) writes valid, deterministic CT studies."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian

from devkit.dicom import CT_IMAGE_STORAGE, GeneratedStudy, main, write_corrupt_file, write_ct_study

REQUIRED_KEYWORDS = [
    "PatientID",
    "PatientName",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPInstanceUID",
    "SOPClassUID",
    "Modality",
    "InstanceNumber",
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "PixelSpacing",
    "SliceThickness",
    "RescaleIntercept",
    "RescaleSlope",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "SeriesNumber",
    "FrameOfReferenceUID",
    "PixelData",
]


def test_study_layout_and_consistent_uids(tmp_path: Path) -> None:
    study = write_ct_study(tmp_path, series=2, slices_per_series=3, rows=32, columns=48, patient_id="P-1")

    assert isinstance(study, GeneratedStudy)
    assert study.patient_id == "P-1"
    assert [f.relative_to(tmp_path).as_posix() for f in study.files] == [
        "0/0001.dcm",
        "0/0002.dcm",
        "0/0003.dcm",
        "1/0001.dcm",
        "1/0002.dcm",
        "1/0003.dcm",
    ]
    assert len(set(study.series_uids)) == 2
    sop_uids: set[str] = set()
    frames: set[str] = set()
    for path in study.files:
        ds = pydicom.dcmread(path)
        series_index = int(path.parent.name)
        for keyword in REQUIRED_KEYWORDS:
            assert keyword in ds, f"{path}: {keyword} missing"
        assert ds.preamble == b"\x00" * 128
        meta = ds.file_meta
        assert meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert meta.MediaStorageSOPClassUID == ds.SOPClassUID == CT_IMAGE_STORAGE
        assert meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert meta.ImplementationClassUID
        assert ds.StudyInstanceUID == study.study_uid
        assert ds.SeriesInstanceUID == study.series_uids[series_index]
        assert ds.SeriesNumber == series_index + 1
        assert ds.InstanceNumber == int(path.stem)
        assert ds.PatientID == "P-1"
        assert ds.Modality == "CT"
        sop_uids.add(ds.SOPInstanceUID)
        frames.add(ds.FrameOfReferenceUID)
        for uid in (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, ds.FrameOfReferenceUID):
            assert len(uid) <= 64
            assert uid.is_valid
        pixels = ds.pixel_array
        assert pixels.shape == (32, 48)
        assert pixels.dtype == np.int16
    assert len(sop_uids) == 6
    assert len(frames) == 1


def test_pixels_are_a_plausible_ct_phantom(tmp_path: Path) -> None:
    study = write_ct_study(tmp_path, slices_per_series=5, rows=64, columns=64)
    middle = pydicom.dcmread(study.files[2])
    hu = middle.pixel_array.astype(np.float64) * float(middle.RescaleSlope) + float(middle.RescaleIntercept)
    assert hu.min() < -900  # air around the phantom
    assert hu.max() > 300  # its bright core
    positions = [float(pydicom.dcmread(f).ImagePositionPatient[2]) for f in study.files]
    assert positions == sorted(positions, reverse=True)
    assert len(set(positions)) == 5


def test_generation_is_deterministic_per_seed(tmp_path: Path) -> None:
    first = write_ct_study(tmp_path / "a", slices_per_series=2, seed=7)
    again = write_ct_study(tmp_path / "b", slices_per_series=2, seed=7)
    other = write_ct_study(tmp_path / "c", slices_per_series=2, seed=8)

    assert first.study_uid == again.study_uid
    assert first.series_uids == again.series_uids
    assert [f.read_bytes() for f in first.files] == [f.read_bytes() for f in again.files]
    assert other.study_uid != first.study_uid
    assert set(other.series_uids).isdisjoint(first.series_uids)
    assert pydicom.dcmread(other.files[0]).PixelData != pydicom.dcmread(first.files[0]).PixelData


def test_modality_and_patient_are_configurable(tmp_path: Path) -> None:
    study = write_ct_study(tmp_path, slices_per_series=1, modality="OT", patient_id="X")
    ds = pydicom.dcmread(study.files[0])
    assert ds.Modality == "OT"
    assert ds.PatientID == "X"
    assert ds.SOPClassUID == CT_IMAGE_STORAGE


@pytest.mark.parametrize(
    ("series", "slices", "rows", "columns"), [(0, 1, 1, 1), (1, 0, 1, 1), (1, 1, 0, 1), (1, 1, 1, -1)]
)
def test_rejects_empty_dimensions(tmp_path: Path, series: int, slices: int, rows: int, columns: int) -> None:
    with pytest.raises(ValueError, match=">= 1"):
        write_ct_study(tmp_path, series=series, slices_per_series=slices, rows=rows, columns=columns)


def test_corrupt_file_looks_like_dicom_but_does_not_parse(tmp_path: Path) -> None:
    path = write_corrupt_file(tmp_path / "sub" / "bad.dcm")

    data = path.read_bytes()
    assert data[128:132] == b"DICM"
    with pytest.raises(OSError):
        pydicom.dcmread(path)
    with pytest.raises(OSError):
        pydicom.dcmread(path, force=True)


def test_cli_writes_study_and_prints_uid_and_count(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main([str(tmp_path), "--series", "2", "--slices", "3", "--rows", "16", "--columns", "16"])

    assert code == 0
    lines = dict(line.split("=", 1) for line in capsys.readouterr().out.splitlines())
    assert lines["files"] == "6"
    assert len(list(tmp_path.rglob("*.dcm"))) == 6
    ds = pydicom.dcmread(tmp_path / "1" / "0003.dcm")
    assert ds.StudyInstanceUID == lines["StudyInstanceUID"]
    assert ds.Rows == ds.Columns == 16
