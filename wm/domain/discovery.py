"""Data discovery, pure: which applications want a file, and which bucket it joins.

A bucket gathers the files of one application revision that share a grouping value (the
StudyInstanceUID by default). It stays open while files keep arriving and closes ``quiet_period_s``
after the last one. A file that arrives after its bucket closed opens the next *generation* of that
bucket: a new bucket, processed as its own job. Bucket ids are derived from the business key, so every
replica computes the same id for the same bucket.

Complete studies: an instance sent twice (same SOP Instance UID) counts once, its latest copy
(`latest_per_instance`). A later generation (the study resent, or more of it sent, after its job ran) runs
only when it brings an instance the earlier generations did not have, and then on the whole study
(`after_earlier_generations`); one that brings none is a set of duplicates, counted, and runs nothing.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from schemas.applications import GROUPING_TAGS, ApplicationDefinition
from schemas.events import BucketFile, BucketReady, DicomIdentifiers, PayloadArrived


@dataclass(frozen=True)
class Candidate:
    """An application revision that may want a file."""

    name: str
    revision: int
    definition: ApplicationDefinition


@dataclass(frozen=True)
class Placement:
    """Where a file goes: the bucket key (application revision and grouping value) and its quiet period."""

    application: str
    revision: int
    grouping_tag: str
    grouping_value: str
    quiet_period_s: float

    @property
    def bucket_key(self) -> str:
        """Stable across replicas; the grouping value is hashed (it may hold PHI such as a patient id)."""
        digest = hashlib.sha256(self.grouping_value.encode()).hexdigest()[:20]
        return f"{self.application}.r{self.revision}.{digest}"

    def bucket_id(self, generation: int) -> str:
        """The id of one generation of this bucket."""
        return f"{self.bucket_key}.g{generation}"


@dataclass(frozen=True)
class Joined:
    """The bucket a file ended up heading for, and when that bucket is due to close."""

    bucket_id: str
    closes_at: datetime


def refusal(definition: ApplicationDefinition, event: PayloadArrived) -> str | None:
    """Why the application's filters refuse the file, or None when it accepts it."""
    filters = definition.discovery.filters
    modality = (event.dicom.modality or "").upper()
    if filters.modalities and modality not in {m.upper() for m in filters.modalities}:
        return f"modality {modality or 'none'} not in {filters.modalities}"
    if filters.sop_class_uids and event.dicom.sop_class_uid not in filters.sop_class_uids:
        return f"SOP class {event.dicom.sop_class_uid} not accepted"
    if filters.calling_ae_titles and event.calling_ae_title not in filters.calling_ae_titles:
        return f"calling AE title {event.calling_ae_title} not accepted"
    return None


def grouping_value(definition: ApplicationDefinition, dicom: DicomIdentifiers) -> str | None:
    """The file's value of the application's grouping tag (None when the file lacks it)."""
    value = getattr(dicom, GROUPING_TAGS[definition.discovery.grouping_tag])
    return str(value) if value else None


def placements(candidates: list[Candidate], event: PayloadArrived) -> tuple[list[Placement], list[str]]:
    """The buckets a file joins, and why each other candidate refused it."""
    placed: list[Placement] = []
    refused: list[str] = []
    for candidate in candidates:
        definition = candidate.definition
        reason = refusal(definition, event)
        value = grouping_value(definition, event.dicom)
        if reason is None and value is None:
            reason = f"no value for grouping tag {definition.discovery.grouping_tag}"
        if reason is not None:
            refused.append(f"{candidate.name}: {reason}")
            continue
        assert value is not None
        placed.append(
            Placement(
                candidate.name,
                candidate.revision,
                definition.discovery.grouping_tag,
                value,
                definition.discovery.quiet_period_s,
            )
        )
    return placed, refused


def file_id(placement: Placement, event: PayloadArrived) -> str:
    """A file's identity within a bucket key: the same event delivered twice maps to the same id."""
    return f"{placement.bucket_key}:{event.file.key}"


def closes_at(last_file_at: datetime, quiet_period_s: float) -> datetime:
    """When a bucket closes if no other file arrives."""
    return last_file_at + timedelta(seconds=quiet_period_s)


def latest_per_instance(files: Sequence[BucketFile]) -> list[BucketFile]:
    """One file per SOP Instance UID, the last of ``files`` (given in arrival order) that carries it."""
    return list({file.dicom.sop_instance_uid: file for file in files}.values())


def after_earlier_generations(
    earlier: Sequence[BucketFile], arrived: Sequence[BucketFile]
) -> tuple[list[BucketFile], int]:
    """What a later generation runs on, and how many of its instances the earlier ones had already.

    ``earlier``: the files the last generation that ran had (the whole study so far); ``arrived``: this
    generation's files, in arrival order. Nothing (an empty list) when every arrived instance is known.
    """
    arrived = latest_per_instance(arrived)
    known = {file.dicom.sop_instance_uid for file in earlier}
    duplicates = sum(file.dicom.sop_instance_uid in known for file in arrived)
    if duplicates == len(arrived):
        return [], duplicates
    return latest_per_instance([*earlier, *arrived]), duplicates


def bucket_ready(
    bucket_id: str,
    placement: Placement,
    correlation_id: str,
    files: list[BucketFile],
    opened_at: datetime,
    closed_at: datetime,
    possibly_incomplete: bool = False,
) -> BucketReady:
    """The event a closed bucket emits; one file per instance, in a stable order (series, SOP instance).

    ``files`` come in arrival order: an instance sent twice is the later copy.
    """
    ordered = sorted(
        latest_per_instance(files),
        key=lambda f: (f.dicom.series_instance_uid, f.dicom.sop_instance_uid, f.file.key),
    )
    return BucketReady(
        correlation_id=correlation_id,
        bucket_id=bucket_id,
        application_id=placement.application,
        application_revision=placement.revision,
        grouping_tag=placement.grouping_tag,
        grouping_value=placement.grouping_value,
        files=ordered,
        opened_at=opened_at,
        closed_at=closed_at,
        possibly_incomplete=possibly_incomplete,
    )
