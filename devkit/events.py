"""Event factories for tests."""

from __future__ import annotations

import uuid

from schemas.events import DicomIdentifiers, FileRef, PayloadArrived


def payload_arrived(
    payload_id: str | None = None,
    *,
    study_uid: str = "1.2.3.4",
    called_ae: str = "MWM",
    calling_ae: str = "MODALITY",
    key: str | None = None,
) -> PayloadArrived:
    """A valid payload.arrived for one CT file."""
    payload_id = payload_id or uuid.uuid4().hex
    sop_uid = f"1.2.3.4.5.{uuid.uuid4().int % 10**12}"
    return PayloadArrived(
        correlation_id=payload_id,
        payload_id=payload_id,
        file=FileRef(bucket="mwm-test", key=key or f"payloads/{payload_id}/{sop_uid}.dcm", size=1024),
        dicom=DicomIdentifiers(
            study_instance_uid=study_uid,
            series_instance_uid=f"{study_uid}.1",
            sop_instance_uid=sop_uid,
            sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
            modality="CT",
        ),
        calling_ae_title=calling_ae,
        called_ae_title=called_ae,
        source="dimse",
    )
