"""Complete studies, pure: one file per instance, and what a later generation of a bucket runs on."""

from __future__ import annotations

from schemas.events import BucketFile, DicomIdentifiers, FileRef
from wm.domain.discovery import after_earlier_generations, latest_per_instance


def file(sop: str, payload: str = "p1") -> BucketFile:
    ids = DicomIdentifiers(
        study_instance_uid="1.2.3",
        series_instance_uid="1.2.3.4",
        sop_instance_uid=sop,
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
    )
    ref = FileRef(bucket="mwm", key=f"payloads/{payload}/1.2.3/1.2.3.4/{sop}.dcm", size=10)
    return BucketFile(file=ref, dicom=ids)


def test_an_instance_sent_twice_counts_once_as_its_later_copy() -> None:
    files = latest_per_instance([file("1.1"), file("1.2"), file("1.1", payload="p2")])
    assert [(f.dicom.sop_instance_uid, f.file.key.split("/")[1]) for f in files] == [
        ("1.1", "p2"),
        ("1.2", "p1"),
    ]


def test_a_resent_study_with_no_new_instance_runs_nothing_and_counts_its_duplicates() -> None:
    earlier = [file("1.1"), file("1.2"), file("1.3")]
    members, duplicates = after_earlier_generations(earlier, [file(s, "p2") for s in ("1.1", "1.2", "1.3")])
    assert (members, duplicates) == ([], 3)


def test_a_resent_study_with_new_instances_runs_on_the_whole_study() -> None:
    earlier = [file("1.1"), file("1.2")]
    arrived = [file("1.1", "p2"), file("1.2", "p2"), file("1.3", "p2"), file("1.4", "p2")]
    members, duplicates = after_earlier_generations(earlier, arrived)
    assert duplicates == 2
    assert sorted(f.dicom.sop_instance_uid for f in members) == ["1.1", "1.2", "1.3", "1.4"]
    assert all("/p2/" in f.file.key for f in members), "the resent copies replace the earlier ones"


def test_new_instances_alone_run_with_the_earlier_ones() -> None:
    members, duplicates = after_earlier_generations([file("1.1")], [file("1.2", "p2")])
    assert duplicates == 0 and sorted(f.dicom.sop_instance_uid for f in members) == ["1.1", "1.2"]
