"""Synthetic but valid DICOM studies for tests, the demo and benchmarks.

`write_ct_study` writes a CT study (CT Image Storage, Explicit VR Little Endian, 16-bit signed pixels) whose
UIDs and pixel data are deterministic functions of ``seed`` and ``patient_id``: two calls with the same
arguments write byte-identical files, so use different seeds (or patient IDs) for distinct studies.
`write_corrupt_file` writes a file that looks like DICOM from the outside but cannot be parsed.

Run as ``python -m devkit.dicom OUTDIR --series N --slices N --rows N --columns N`` to write a study; the
benchmark study (1 series x 324 slices of 512 x 512, about 164 MB) takes a few seconds.
"""

from __future__ import annotations

import argparse
import struct
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

__all__ = [
    "CT_IMAGE_STORAGE",
    "IMPLEMENTATION_CLASS_UID",
    "GeneratedStudy",
    "main",
    "write_corrupt_file",
    "write_ct_study",
]

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
"""SOP Class UID of CT Image Storage."""

IMPLEMENTATION_CLASS_UID = "1.2.826.0.1.3680043.8.498.1"
"""Implementation Class UID written into the file meta of generated files (under pydicom's UID root)."""

_IMPLEMENTATION_VERSION_NAME = "MWM_TESTGEN"
_PYDICOM_MAJOR = int(pydicom.__version__.split(".", 1)[0])
_PIXEL_SPACING_MM = 0.7
_SLICE_THICKNESS_MM = 1.25
_RESCALE_INTERCEPT = -1024
_STUDY_DATE = "20260101"
_STUDY_TIME = "120000"


@dataclass(frozen=True)
class GeneratedStudy:
    """What `write_ct_study` wrote: the study's UIDs and the files, in series then instance order."""

    study_uid: str
    series_uids: list[str]
    files: list[Path]
    patient_id: str


def _uid(*parts: object) -> str:
    """A UID under pydicom's root, derived deterministically from ``parts``."""
    return str(generate_uid(entropy_srcs=["mwm-testing-dicom", *(str(p) for p in parts)]))


class _Phantom:
    """A cheap deterministic phantom: a soft-tissue sphere with a bright core in air, plus a gentle gradient.

    Each slice is computed with a handful of vectorised numpy operations on a precomputed in-plane radius
    grid, so a 512 x 512 slice costs about a millisecond.
    """

    def __init__(self, rows: int, columns: int, slices: int, seed: int) -> None:
        rng = np.random.default_rng(seed)
        cy = rows / 2 + rng.uniform(-0.1, 0.1) * rows
        cx = columns / 2 + rng.uniform(-0.1, 0.1) * columns
        yy, xx = np.mgrid[0:rows, 0:columns].astype(np.float32)
        self._r2 = (yy - cy) ** 2 + (xx - cx) ** 2
        self._radius = 0.4 * min(rows, columns)
        self._slices = max(slices, 1)
        # Stored values (HU + 1024): air ~ 24, soft tissue ~ 1064, core ~ 1424, plus a small x/y ramp.
        ramp_scale = float(rng.uniform(10.0, 40.0))
        ramp = (xx / max(columns - 1, 1) + yy / max(rows - 1, 1)) * ramp_scale
        self._background = (24.0 + ramp).astype(np.int16)
        self._tissue = (1064.0 + ramp).astype(np.int16)
        self._core = (1424.0 + ramp).astype(np.int16)

    def slice(self, index: int) -> npt.NDArray[np.int16]:
        """The stored pixel values of slice ``index`` (0-based), shape (rows, columns), dtype int16."""
        z = (index + 0.5) / self._slices * 2.0 - 1.0  # -1 .. 1 through the volume
        r_slice2 = max(0.0, 1.0 - z * z) * self._radius**2
        out: npt.NDArray[np.int16] = np.where(self._r2 <= r_slice2, self._tissue, self._background)
        np.copyto(out, self._core, where=self._r2 <= r_slice2 * 0.16)
        return out


def _file_meta(sop_instance_uid: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(CT_IMAGE_STORAGE)
    meta.MediaStorageSOPInstanceUID = UID(sop_instance_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = UID(IMPLEMENTATION_CLASS_UID)
    meta.ImplementationVersionName = _IMPLEMENTATION_VERSION_NAME
    return meta


def _study_level(ds: Dataset, *, patient_id: str, study_uid: str, seed: int) -> None:
    """Patient, general study and equipment attributes shared by every instance of the study."""
    ds.PatientName = f"MWM^Test^{patient_id}"
    ds.PatientID = patient_id
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.StudyInstanceUID = study_uid
    ds.StudyDate = _STUDY_DATE
    ds.StudyTime = _STUDY_TIME
    ds.StudyID = f"{seed % 10**8}"
    ds.AccessionNumber = f"ACC{seed % 10**13:013d}"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "MWM synthetic CT"
    ds.Manufacturer = "MWM"
    ds.InstitutionName = "MWM test suite"


def _image_level(ds: Dataset, *, rows: int, columns: int, index: int, pixels: bytes) -> None:
    """Image plane, image pixel and CT image attributes of one slice."""
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.InstanceNumber = index + 1
    ds.AcquisitionNumber = 1
    x0 = -columns * _PIXEL_SPACING_MM / 2
    y0 = -rows * _PIXEL_SPACING_MM / 2
    z = -index * _SLICE_THICKNESS_MM
    ds.ImagePositionPatient = [f"{x0:.3f}", f"{y0:.3f}", f"{z:.3f}"]
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.SliceLocation = f"{z:.3f}"
    ds.PixelSpacing = [f"{_PIXEL_SPACING_MM}", f"{_PIXEL_SPACING_MM}"]
    ds.SliceThickness = f"{_SLICE_THICKNESS_MM}"
    ds.KVP = "120"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = columns
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.RescaleIntercept = f"{_RESCALE_INTERCEPT}"
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    ds.WindowCenter = "40"
    ds.WindowWidth = "400"
    ds.PixelData = pixels


def _write(path: Path, ds: Dataset) -> None:
    """Write ``ds`` in DICOM file format (preamble, 'DICM', file meta) with its file meta transfer syntax."""
    if _PYDICOM_MAJOR >= 3:
        pydicom.dcmwrite(path, ds, enforce_file_format=True)
    else:  # pragma: no cover - pydicom 2.4 spelling
        ds.is_little_endian = True
        ds.is_implicit_VR = False
        pydicom.dcmwrite(path, ds, write_like_original=False)


def write_ct_study(
    directory: Path,
    *,
    series: int = 1,
    slices_per_series: int = 4,
    rows: int = 64,
    columns: int = 64,
    patient_id: str = "MWM-TEST",
    modality: str = "CT",
    seed: int = 0,
) -> GeneratedStudy:
    """Write a synthetic CT study under ``directory`` as ``<series_index>/<instance:04d>.dcm``.

    ``series_index`` counts from 0 and ``instance`` from 1 (the file's InstanceNumber). Every file is a CT
    Image Storage instance in Explicit VR Little Endian with 16-bit signed pixels; all UIDs and pixel values
    are deterministic functions of ``seed`` and ``patient_id``. Existing files with the same names are
    overwritten. ``modality`` only sets the Modality attribute (the SOP class stays CT Image Storage).
    """
    if series < 1 or slices_per_series < 1 or rows < 1 or columns < 1:
        raise ValueError("series, slices_per_series, rows and columns must all be >= 1")
    study_uid = _uid("study", seed, patient_id)
    frame_of_reference_uid = _uid("frame-of-reference", seed, patient_id)
    phantom = _Phantom(rows, columns, slices_per_series, seed)
    # The pixel pattern depends only on the slice index: compute each slice once, reuse it for every series.
    slice_bytes = [phantom.slice(i).astype("<i2", copy=False).tobytes() for i in range(slices_per_series)]
    series_uids: list[str] = []
    files: list[Path] = []
    for s in range(series):
        series_uid = _uid("series", seed, patient_id, s)
        series_uids.append(series_uid)
        series_dir = directory / str(s)
        series_dir.mkdir(parents=True, exist_ok=True)
        for i in range(slices_per_series):
            sop_uid = _uid("instance", seed, patient_id, s, i)
            ds = Dataset()
            ds.file_meta = _file_meta(sop_uid)
            ds.preamble = b"\x00" * 128
            ds.SOPClassUID = CT_IMAGE_STORAGE
            ds.SOPInstanceUID = sop_uid
            ds.Modality = modality
            _study_level(ds, patient_id=patient_id, study_uid=study_uid, seed=seed)
            ds.SeriesInstanceUID = series_uid
            ds.SeriesNumber = s + 1
            ds.SeriesDescription = f"Synthetic series {s + 1}"
            ds.FrameOfReferenceUID = frame_of_reference_uid
            ds.PositionReferenceIndicator = ""
            _image_level(ds, rows=rows, columns=columns, index=i, pixels=slice_bytes[i])
            path = series_dir / f"{i + 1:04d}.dcm"
            _write(path, ds)
            files.append(path)
    return GeneratedStudy(study_uid=study_uid, series_uids=series_uids, files=files, patient_id=patient_id)


def write_corrupt_file(path: Path) -> Path:
    """Write a file that starts like DICOM (128-byte preamble, 'DICM') but cannot be parsed; return ``path``.

    A valid file meta group (Explicit VR Little Endian) and SOP Class UID are followed by a sequence of
    undefined length whose items are garbage and which breaks off mid-stream: ``pydicom.dcmread`` raises
    (``OSError``, with or without ``force=True``) and dcmtk's ``dcmdump`` reports a parse error.
    """

    def element(group: int, elem: int, vr: bytes, value: bytes) -> bytes:
        if len(value) % 2:
            value += b"\x00"
        return struct.pack("<HH", group, elem) + vr + struct.pack("<H", len(value)) + value

    meta_body = element(0x0002, 0x0010, b"UI", ExplicitVRLittleEndian.encode("ascii"))
    meta = struct.pack("<HH", 0x0002, 0x0000) + b"UL" + struct.pack("<HI", 4, len(meta_body)) + meta_body
    body = element(0x0008, 0x0016, b"UI", CT_IMAGE_STORAGE.encode("ascii"))
    # (0008,1140) ReferencedImageSequence, SQ of undefined length, then bytes that are no item tag.
    body += struct.pack("<HH", 0x0008, 0x1140) + b"SQ\x00\x00" + struct.pack("<I", 0xFFFF_FFFF)
    body += b"\xde\xad\xbe\xef" * 6
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x00" * 128 + b"DICM" + meta + body)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: write a study into OUTDIR and print its StudyInstanceUID and file count."""
    parser = argparse.ArgumentParser(prog="python -m devkit.dicom", description=main.__doc__)
    parser.add_argument("outdir", type=Path, metavar="OUTDIR", help="directory to write the study into")
    parser.add_argument("--series", type=int, default=1, help="number of series (default 1)")
    parser.add_argument("--slices", type=int, default=4, help="slices per series (default 4)")
    parser.add_argument("--rows", type=int, default=64, help="rows per slice (default 64)")
    parser.add_argument("--columns", type=int, default=64, help="columns per slice (default 64)")
    parser.add_argument("--patient-id", default="MWM-TEST", help="PatientID (default MWM-TEST)")
    parser.add_argument("--modality", default="CT", help="Modality attribute (default CT)")
    parser.add_argument("--seed", type=int, default=0, help="seed for UIDs and pixels (default 0)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    study = write_ct_study(
        args.outdir,
        series=args.series,
        slices_per_series=args.slices,
        rows=args.rows,
        columns=args.columns,
        patient_id=args.patient_id,
        modality=args.modality,
        seed=args.seed,
    )
    elapsed = time.perf_counter() - started
    print(f"StudyInstanceUID={study.study_uid}")
    print(f"files={len(study.files)}")
    print(f"wrote {len(study.files)} files in {elapsed:.2f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
