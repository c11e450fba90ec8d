"""wm.dicom.read_identifiers: identifiers from the header only, and a precise InvalidDicom otherwise."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import pydicom
import pytest

from devkit.dicom import CT_IMAGE_STORAGE, GeneratedStudy, write_corrupt_file, write_ct_study
from wm.dicom import InvalidDicom, read_identifiers
from wm.errors import PermanentError


@pytest.fixture
def study(tmp_path: Path) -> GeneratedStudy:
    return write_ct_study(tmp_path / "study", series=2, slices_per_series=2, rows=128, columns=128, seed=3)


def rewritten(source: Path, target: Path, **changes: str | None) -> Path:
    """``source`` with attributes changed (None deletes one), saved as ``target``."""
    dataset = pydicom.dcmread(source)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about the invalid values some tests write
        for keyword, value in changes.items():
            if value is None:
                delattr(dataset, keyword)
            else:
                setattr(dataset, keyword, value)
        dataset.save_as(target, enforce_file_format=True)
    return target


def test_identifiers_of_a_generated_file(study: GeneratedStudy) -> None:
    ids = read_identifiers(study.files[-1])
    dataset = pydicom.dcmread(study.files[-1])
    assert ids.study_instance_uid == study.study_uid
    assert ids.series_instance_uid == study.series_uids[1]
    assert ids.sop_instance_uid == dataset.SOPInstanceUID
    assert ids.sop_class_uid == CT_IMAGE_STORAGE
    assert (ids.modality, ids.patient_id) == ("CT", study.patient_id)
    assert ids.accession_number == "ACC0000000000003"


def test_a_stream_is_read_only_up_to_the_pixel_data(study: GeneratedStudy) -> None:
    data = study.files[0].read_bytes()
    stream = io.BytesIO(data)
    ids = read_identifiers(stream)
    assert ids.study_instance_uid == study.study_uid
    pixel_bytes = 128 * 128 * 2
    assert stream.tell() <= len(data) - pixel_bytes, "the pixel data must not be read"


def test_optional_identifiers_may_be_absent(study: GeneratedStudy, tmp_path: Path) -> None:
    absent: dict[str, str | None] = {"Modality": None, "PatientID": None, "AccessionNumber": None}
    path = rewritten(study.files[0], tmp_path / "bare.dcm", **absent)
    ids = read_identifiers(path)
    assert (ids.modality, ids.patient_id, ids.accession_number) == (None, None, None)


REQUIRED = ["SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "SOPClassUID"]


@pytest.mark.parametrize("keyword", REQUIRED)
def test_a_missing_required_identifier_is_named(study: GeneratedStudy, tmp_path: Path, keyword: str) -> None:
    path = rewritten(study.files[0], tmp_path / "missing.dcm", **{keyword: None})
    with pytest.raises(InvalidDicom, match=f"DICOM header lacks {keyword}$"):
        read_identifiers(path)


def test_an_empty_required_identifier_counts_as_missing(study: GeneratedStudy, tmp_path: Path) -> None:
    path = rewritten(study.files[0], tmp_path / "empty.dcm", SeriesInstanceUID="")
    with pytest.raises(InvalidDicom, match="lacks SeriesInstanceUID"):
        read_identifiers(path)


def test_an_invalid_uid_is_named(study: GeneratedStudy, tmp_path: Path) -> None:
    path = rewritten(study.files[0], tmp_path / "bad-uid.dcm", StudyInstanceUID="1.2.abc")
    with pytest.raises(InvalidDicom, match="study_instance_uid"):
        read_identifiers(path)


def test_a_corrupt_file_cannot_be_parsed(tmp_path: Path) -> None:
    with pytest.raises(InvalidDicom, match="cannot parse DICOM header") as raised:
        read_identifiers(write_corrupt_file(tmp_path / "corrupt.dcm"))
    assert isinstance(raised.value, PermanentError)


def test_a_file_that_is_not_dicom_says_so(tmp_path: Path) -> None:
    path = tmp_path / "report.pdf"
    path.write_bytes(b"%PDF-1.7\n" + b"\x00" * 400)
    with pytest.raises(InvalidDicom, match="DICM"):
        read_identifiers(path)


def test_a_file_cut_short_in_its_header_lacks_what_was_cut_off(study: GeneratedStudy) -> None:
    data = study.files[0].read_bytes()
    cut = data.index(study.study_uid.encode())  # inside the StudyInstanceUID element
    with pytest.raises(InvalidDicom, match=r"lacks StudyInstanceUID, SeriesInstanceUID$"):
        read_identifiers(io.BytesIO(data[:cut]))
