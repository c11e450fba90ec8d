"""`wm.dicom_encoding`: an incomplete encoding is found wherever the file was cut, a complete one passes."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRBigEndian, ImplicitVRLittleEndian, JPEGBaseline8Bit

from devkit.dicom import write_ct_study
from wm.dicom_encoding import encoding_problem
from wm.pynetdicom_patches import UnsupportedPynetdicom, check_version


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
