"""wm.domain.discovery: filters, grouping, placements, bucket identity and the bucket.ready event."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from schemas.events import BucketFile
from tests.unit.builders import application, candidate, payload_arrived
from wm.domain.discovery import (
    Placement,
    bucket_ready,
    closes_at,
    file_id,
    grouping_value,
    placements,
    refusal,
)

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"


def test_no_filters_accept_every_file() -> None:
    assert refusal(application(), payload_arrived()) is None


def test_the_modality_filter_ignores_case_and_names_the_modality_it_refused() -> None:
    assert refusal(application(discovery={"filters": {"modalities": ["ct"]}}), payload_arrived()) is None
    reason = refusal(application(discovery={"filters": {"modalities": ["MR", "PT"]}}), payload_arrived())
    assert reason is not None and reason.startswith("modality CT not in")


def test_a_file_without_a_modality_is_refused_by_a_modality_filter() -> None:
    event = payload_arrived()
    event = event.model_copy(update={"dicom": event.dicom.model_copy(update={"modality": None})})
    reason = refusal(application(discovery={"filters": {"modalities": ["CT"]}}), event)
    assert reason is not None and "modality none" in reason


def test_the_sop_class_and_calling_ae_filters() -> None:
    by_class = application(discovery={"filters": {"sop_class_uids": ["1.2.840.10008.5.1.4.1.1.4"]}})
    by_caller = application(discovery={"filters": {"calling_ae_titles": ["SCANNER1"]}})
    assert refusal(by_class, payload_arrived()) == f"SOP class {CT_IMAGE} not accepted"
    assert (
        refusal(by_caller, payload_arrived(calling_ae="SCANNER2")) == "calling AE title SCANNER2 not accepted"
    )
    assert refusal(by_caller, payload_arrived(calling_ae="SCANNER1")) is None


def test_the_grouping_value_is_the_files_value_of_the_grouping_tag() -> None:
    event = payload_arrived(study_uid="1.2.3")
    assert grouping_value(application(), event.dicom) == "1.2.3"
    by_series = application(discovery={"grouping_tag": "0020,000E"})
    assert grouping_value(by_series, event.dicom) == "1.2.3.1"
    by_patient = application(discovery={"grouping_tag": "0010,0020"})
    assert grouping_value(by_patient, event.dicom) is None


def test_placements_keep_the_wanting_applications_and_say_why_the_others_refused() -> None:
    wanting = application("ct", discovery={"filters": {"modalities": ["CT"]}, "quiet_period_s": 7})
    refusing = application("mr", discovery={"filters": {"modalities": ["MR"]}})
    ungroupable = application("by-patient", discovery={"grouping_tag": "0010,0020"})
    candidates = [candidate(wanting, 3), candidate(refusing), candidate(ungroupable)]

    placed, refused = placements(candidates, payload_arrived(study_uid="1.2.3"))

    assert placed == [Placement("ct", 3, "0020,000D", "1.2.3", 7)]
    assert refused == ["mr: modality CT not in ['MR']", "by-patient: no value for grouping tag 0010,0020"]


def test_no_candidates_place_nothing() -> None:
    assert placements([], payload_arrived()) == ([], [])


def test_a_bucket_key_is_stable_per_revision_and_value_and_hides_the_value() -> None:
    placement = Placement("seg", 2, "0010,0020", "PATIENT-42", 5)
    same = Placement("seg", 2, "0010,0020", "PATIENT-42", 60)
    assert placement.bucket_key == same.bucket_key and "PATIENT-42" not in placement.bucket_key
    assert placement.bucket_key.startswith("seg.r2.")
    assert Placement("seg", 3, "0010,0020", "PATIENT-42", 5).bucket_key != placement.bucket_key
    assert Placement("seg", 2, "0010,0020", "PATIENT-43", 5).bucket_key != placement.bucket_key
    assert placement.bucket_id(0) != placement.bucket_id(1)
    assert placement.bucket_id(1) == f"{placement.bucket_key}.g1"


def test_a_redelivered_event_has_the_same_file_id_and_another_file_another() -> None:
    placement = Placement("seg", 1, "0020,000D", "1.2.3", 5)
    event = payload_arrived()
    assert file_id(placement, event) == file_id(placement, event.model_copy())
    assert file_id(placement, event) != file_id(placement, payload_arrived())


def test_a_bucket_closes_one_quiet_period_after_its_last_file() -> None:
    last = datetime(2026, 1, 1, tzinfo=UTC)
    assert closes_at(last, 2.5) == last + timedelta(seconds=2.5)


def test_bucket_ready_orders_files_by_series_then_instance() -> None:
    events = [payload_arrived(study_uid="1.2.3") for _ in range(3)]
    files = [BucketFile(file=e.file, dicom=e.dicom) for e in events]
    placement = Placement("seg", 1, "0020,000D", "1.2.3", 5)
    now = datetime.now(UTC)

    ready = bucket_ready(placement.bucket_id(0), placement, "corr", list(reversed(files)), now, now)

    assert [f.dicom.sop_instance_uid for f in ready.files] == sorted(e.dicom.sop_instance_uid for e in events)
    assert (ready.application_id, ready.application_revision, ready.grouping_value) == ("seg", 1, "1.2.3")
    assert ready.bucket_id == placement.bucket_id(0)
