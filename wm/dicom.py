"""Reading the identifiers MWM matches and groups on from a DICOM file's header, never its pixel data.

Shared by the DICOM gateway and the Payloads API. `read_identifiers` takes a path or a binary stream of a
DICOM Part-10 file (128-byte preamble, ``DICM``, file meta) and reads only the few attributes it needs
(``dcmread(..., stop_before_pixels=True, specific_tags=...)``): a 1 GB multi-frame file costs the same as a
CT slice. A file that cannot be parsed, or lacks a required attribute, raises `InvalidDicom` (a
`PermanentError`) whose message names what is missing or why the header cannot be read.

`object_key` is the object-store key of a received file, the contract between ingest (gateway, Payloads
API), engines and export: ``payloads/{payload_id}/{study}/{series}/{sop}.dcm``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import IO, Any

from pydantic import ValidationError
from pydicom import dcmread
from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset

from schemas.events import DicomIdentifiers
from wm.errors import PermanentError

__all__ = [
    "IDENTIFIER_KEYWORDS",
    "IDENTIFIER_TAGS",
    "PAYLOADS",
    "REQUIRED_KEYWORDS",
    "InvalidDicom",
    "identifiers_from_raw",
    "object_key",
    "payload_prefix",
    "read_identifiers",
]

REQUIRED_KEYWORDS: dict[str, str] = {
    "StudyInstanceUID": "study_instance_uid",
    "SeriesInstanceUID": "series_instance_uid",
    "SOPInstanceUID": "sop_instance_uid",
    "SOPClassUID": "sop_class_uid",
}
"""DICOM keyword -> `DicomIdentifiers` field, for the attributes a file must have."""

OPTIONAL_KEYWORDS: dict[str, str] = {
    "Modality": "modality",
    "PatientID": "patient_id",
    "AccessionNumber": "accession_number",
}
"""DICOM keyword -> `DicomIdentifiers` field, for the attributes read when present."""

IDENTIFIER_KEYWORDS: tuple[str, ...] = (*REQUIRED_KEYWORDS, *OPTIONAL_KEYWORDS)
"""Every attribute `read_identifiers` reads (and nothing else)."""

IDENTIFIER_TAGS: dict[int, str] = {tag_for_keyword(keyword): keyword for keyword in IDENTIFIER_KEYWORDS}  # type: ignore[misc]
"""The tag of each of `IDENTIFIER_KEYWORDS` -> its keyword."""

Source = str | os.PathLike[str] | IO[bytes]


PAYLOADS = "payloads/"
"""The object-store prefix of every received file."""


def payload_prefix(payload_id: str) -> str:
    """The object-store prefix under which every file of one payload is stored."""
    return f"{PAYLOADS}{payload_id}/"


def object_key(payload_id: str, ids: DicomIdentifiers) -> str:
    """Where a received file is stored: ``payloads/{payload_id}/{study}/{series}/{sop}.dcm``."""
    study, series = ids.study_instance_uid, ids.series_instance_uid
    return f"{payload_prefix(payload_id)}{study}/{series}/{ids.sop_instance_uid}.dcm"


class InvalidDicom(PermanentError):
    """The file is not DICOM, cannot be parsed, or lacks an attribute MWM needs."""


def read_identifiers(source: Source) -> DicomIdentifiers:
    """The study, series, instance and SOP class UIDs (plus modality, patient ID, accession number).

    ``source`` is a path or a binary stream positioned at the start of a Part-10 file; a stream is left
    positioned after the header. Raises `InvalidDicom` naming what is wrong.
    """
    header = _read_header(source)
    return _identifiers({keyword: _text(header, keyword) for keyword in IDENTIFIER_KEYWORDS})


def identifiers_from_raw(values: Mapping[int, bytes]) -> DicomIdentifiers:
    """The identifiers from the raw values of a data set's top-level elements (tag -> value bytes).

    What `wm.dicom_encoding.inspect_file` collects for `IDENTIFIER_TAGS`; decoded and validated exactly as
    `read_identifiers` does. Raises `InvalidDicom` naming what is missing or invalid.
    """
    return _identifiers({keyword: _decode(values.get(tag, b"")) for tag, keyword in IDENTIFIER_TAGS.items()})


def _identifiers(texts: Mapping[str, str]) -> DicomIdentifiers:
    """`DicomIdentifiers` from each of `IDENTIFIER_KEYWORDS`' text ('' when absent)."""
    missing = [keyword for keyword in REQUIRED_KEYWORDS if not texts[keyword]]
    if missing:
        raise InvalidDicom(f"DICOM header lacks {', '.join(missing)}")
    values: dict[str, str | None] = {field: texts[key] for key, field in REQUIRED_KEYWORDS.items()}
    values |= {field: texts[key] or None for key, field in OPTIONAL_KEYWORDS.items()}
    try:
        return DicomIdentifiers.model_validate(values)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise InvalidDicom(f"invalid DICOM identifiers: {problems}") from exc


def _read_header(source: Source) -> Dataset:
    """The header attributes MWM reads; parse failures become `InvalidDicom`."""
    try:
        return dcmread(source, stop_before_pixels=True, specific_tags=list(IDENTIFIER_KEYWORDS))
    except FileNotFoundError:
        raise
    except Exception as exc:  # pydicom raises many types on garbage: all mean "cannot parse"
        raise InvalidDicom(f"cannot parse DICOM header: {type(exc).__name__}: {exc}") from exc


def _text(header: Dataset, keyword: str) -> str:
    """The attribute's value as stripped text ('' when absent or empty).

    Raw values are decoded here rather than by pydicom, whose value validation would only warn: these
    identifiers are validated by `DicomIdentifiers` instead, with a message naming the field.
    """
    element: Any = header.get_item(keyword)
    if element is None:
        return ""
    if isinstance(element, RawDataElement):
        raw = element.value or b""
        return _decode(raw) if isinstance(raw, bytes) else str(raw).strip(" \x00")
    return "" if element.value is None else str(element.value).strip(" \x00")


def _decode(raw: bytes) -> str:
    """A raw value as stripped text (latin-1: every byte decodes; the identifiers are validated next)."""
    return raw.decode("latin-1").strip(" \x00")
