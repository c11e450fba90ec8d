"""Example MAP: a maximum-intensity projection (MIP) of each input series, as a Secondary Capture.

MAP conventions: reads every DICOM file under ``MONAI_INPUTPATH`` (or ``HOLOSCAN_INPUT_PATH``), writes one
``<series uid>-mip.dcm`` per input series under ``MONAI_OUTPUTPATH`` (or ``HOLOSCAN_OUTPUT_PATH``). Exit code
0 on success, 1 when there is no input. Runs with the local engine without a container runtime:
``command: [python, <this file>]``.
"""

from __future__ import annotations

import os
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid


def read_series(input_dir: Path) -> dict[str, list[Dataset]]:
    """Every readable DICOM image under ``input_dir``, by series, in instance order."""
    series: dict[str, list[Dataset]] = defaultdict(list)
    for path in sorted(input_dir.rglob("*.dcm")):
        dataset = pydicom.dcmread(path)
        if "PixelData" in dataset:
            series[str(dataset.SeriesInstanceUID)].append(dataset)
    for slices in series.values():
        slices.sort(key=lambda d: int(getattr(d, "InstanceNumber", 0) or 0))
    return series


def mip(slices: list[Dataset]) -> Dataset:
    """A Secondary Capture of the slices' maximum-intensity projection, in the same study."""
    first = slices[0]
    volume = np.stack([s.pixel_array.astype(np.int32) for s in slices])
    projection = volume.max(axis=0)
    projection = ((projection - projection.min()) * (4095 / max(int(np.ptp(projection)), 1))).astype(
        np.uint16
    )
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    out = Dataset()
    out.file_meta = meta
    for keyword in (
        "PatientID",
        "PatientName",
        "PatientBirthDate",
        "PatientSex",
        "StudyInstanceUID",
        "StudyDate",
        "StudyTime",
        "AccessionNumber",
        "StudyID",
        "ReferringPhysicianName",
    ):
        setattr(out, keyword, getattr(first, keyword, ""))
    out.SOPClassUID = SecondaryCaptureImageStorage
    out.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    out.SeriesInstanceUID = generate_uid()
    out.SeriesNumber = 9000 + int(getattr(first, "SeriesNumber", 0) or 0)
    out.SeriesDescription = f"MIP of {getattr(first, 'SeriesDescription', '') or first.SeriesInstanceUID}"[
        :64
    ]
    out.Modality = "OT"
    out.ConversionType = "WSD"
    out.InstanceNumber = 1
    out.ImageType = ["DERIVED", "SECONDARY", "MIP"]
    out.SamplesPerPixel, out.PhotometricInterpretation = 1, "MONOCHROME2"
    out.Rows, out.Columns = projection.shape
    out.BitsAllocated, out.BitsStored, out.HighBit, out.PixelRepresentation = 16, 12, 11, 0
    out.PixelData = projection.tobytes()
    return out


def main() -> int:
    """Project every input series; one output file per series."""
    input_dir = Path(os.environ.get("MONAI_INPUTPATH") or os.environ["HOLOSCAN_INPUT_PATH"])
    output_dir = Path(os.environ.get("MONAI_OUTPUTPATH") or os.environ["HOLOSCAN_OUTPUT_PATH"])
    series = read_series(input_dir)
    if not series:
        print(f"no DICOM images under {input_dir}", file=sys.stderr)
        return 1
    output_dir.mkdir(parents=True, exist_ok=True)
    for series_uid, slices in series.items():
        mip(slices).save_as(output_dir / f"{series_uid}-mip.dcm", enforce_file_format=True)
        print(f"series {series_uid}: {len(slices)} slices -> 1 MIP")
    return 0


if __name__ == "__main__":
    sys.exit(main())
