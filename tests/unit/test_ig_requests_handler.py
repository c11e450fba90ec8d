"""The IG request consumer on fakes: each version's request becomes MWM work once, from its DICOM JSON."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from consumers.ig_requests import IgRequestDeps, handle
from devkit.dicom import write_ct_study
from devkit.ig_emulator import VERSIONS, Version, dicom_json
from schemas.events import BucketReady, DicomIdentifiers, PayloadArrived
from schemas.monai_ig import WorkflowRequestEvent
from tests.unit.builders import application, candidate
from tests.unit.fakes import FakePublisher
from tests.unit.ig_fakes import FakeAeCatalog, FakeObjectStore, golden
from wm.config import IgSettings
from wm.dicom import InvalidDicom, read_identifiers
from wm.errors import PermanentError, TransientError

IG_BUCKET = "monaideploy"


def fixture(version: Version, **changes: Any) -> WorkflowRequestEvent:
    return WorkflowRequestEvent.model_validate(golden("workflow_request", version) | changes)


class World:
    """One ig-requests process: the application ``mip`` on the AE title ``MONAI-MIP``, the IG's bucket
    holding the golden request's two files (CT slices, each with its ``.dcm.json`` unless told)."""

    def __init__(
        self, tmp_path: Path, *, regroup: bool = False, calling_ae_titles: tuple[str, ...] = ()
    ) -> None:
        mip = application(
            "mip",
            ae_titles=["MONAI-MIP"],
            discovery={"filters": {"calling_ae_titles": list(calling_ae_titles)}},
        )
        self.store, self.publisher = FakeObjectStore("mwm"), FakePublisher()
        self.ig_bucket = self.store.in_bucket(IG_BUCKET)
        work = tmp_path / "work"
        work.mkdir()
        self.deps = IgRequestDeps(
            FakeAeCatalog(candidate(mip)), self.store, self.publisher, IgSettings(regroup=regroup), work
        )
        self.study = write_ct_study(tmp_path / "study", slices_per_series=2, rows=8, columns=8, seed=15)
        self.request = fixture("0.4")
        self.keys = [f"{self.request.payload_id}/{item.path}" for item in self.request.payload]

    def upload(self, *, described: bool = True) -> None:
        """The IG's upload of the study under the golden request's keys."""
        for key, path in zip(self.keys, self.study.files, strict=True):
            self.ig_bucket.put(key, path.read_bytes())
            if described:
                self.ig_bucket.put(f"{key}.json", json.dumps(dicom_json(path)).encode())

    def identifiers(self) -> dict[str, DicomIdentifiers]:
        """Each key's identifiers, as its DICOM header holds them."""
        return {key: read_identifiers(path) for key, path in zip(self.keys, self.study.files, strict=True)}

    def buckets(self) -> list[tuple[BucketReady, str | None]]:
        return [(p.event, p.message_id) for p in self.publisher.published if isinstance(p.event, BucketReady)]

    def arrivals(self) -> list[tuple[PayloadArrived, str | None]]:
        return [
            (p.event, p.message_id) for p in self.publisher.published if isinstance(p.event, PayloadArrived)
        ]


@pytest.mark.parametrize("version", VERSIONS)
async def test_each_versions_request_runs_the_application_once_on_all_its_files(
    tmp_path: Path, version: Version
) -> None:
    world = World(tmp_path, calling_ae_titles=("MODALITY",))  # the filter sees trigger.source (0.3: field)
    world.upload()
    request = fixture(version)

    await handle(request, world.deps)

    [(bucket, message_id)] = world.buckets()
    assert bucket.application_id == "mip" and message_id == bucket.bucket_id
    assert bucket.bucket_id.startswith("ig.mip.r1.") and bucket.correlation_id == request.correlation_id
    assert {f.file.key: f.dicom for f in bucket.files} == world.identifiers()
    assert {f.file.bucket for f in bucket.files} == {IG_BUCKET}, "staging copies them across buckets"
    assert sorted(world.store.reads) == [f"{key}.json" for key in sorted(world.keys)], "the .dcm.json only"
    assert world.publisher.of(PayloadArrived) == [], "no second quiet period: discovery is not involved"


async def test_a_request_redelivered_maps_to_the_same_bucket_and_message_ids(tmp_path: Path) -> None:
    world = World(tmp_path)
    world.upload()

    await handle(world.request, world.deps)
    await handle(world.request, world.deps)

    [first, second] = world.buckets()
    assert first[1] == second[1] and first[0].files == second[0].files


async def test_returned_artifacts_are_acknowledged_and_ignored(tmp_path: Path) -> None:
    world = World(tmp_path)  # nothing uploaded: reading the payload would fail
    request = fixture("0.5", workflow_instance_id="wm-instance-1", task_id="task-1")

    await handle(request, world.deps)

    assert world.publisher.published == [] and world.store.reads == []


async def test_workflows_naming_no_mwm_application_fall_back_to_the_called_ae_title(tmp_path: Path) -> None:
    world = World(tmp_path)
    world.upload()

    await handle(fixture("0.5", workflows=["3f1c5a0e-8f2d-4b44-bb0f-9a7e2c1d0e55"]), world.deps)

    [(bucket, _)] = world.buckets()
    assert bucket.application_id == "mip"


async def test_files_the_applications_filters_refuse_run_nothing(tmp_path: Path) -> None:
    world = World(tmp_path, calling_ae_titles=("ANOTHER-MODALITY",))
    world.upload()

    await handle(world.request, world.deps)

    assert world.publisher.published == []


@pytest.mark.parametrize("dicom_json_document", [None, {"0020000D": {"vr": "UI", "Value": ["1.2.3"]}}])
async def test_identifiers_come_from_the_dicom_header_when_the_dcm_json_is_missing_or_incomplete(
    tmp_path: Path, dicom_json_document: dict[str, Any] | None
) -> None:
    world = World(tmp_path)
    world.upload(described=False)
    if dicom_json_document is not None:
        for key in world.keys:
            world.ig_bucket.put(f"{key}.json", json.dumps(dicom_json_document).encode())

    await handle(world.request, world.deps)

    [(bucket, _)] = world.buckets()
    assert {f.file.key: f.dicom for f in bucket.files} == world.identifiers()
    assert set(world.keys) <= set(world.store.reads), "each file's header was read"


async def test_a_file_missing_from_the_bucket_is_a_permanent_failure_naming_it(tmp_path: Path) -> None:
    world = World(tmp_path)
    world.upload()
    del world.store.objects[IG_BUCKET][world.keys[1]]

    with pytest.raises(
        PermanentError, match=f"1 file\\(s\\) not in bucket 'monaideploy', first '{world.keys[1]}'"
    ):
        await handle(world.request, world.deps)

    assert world.publisher.published == []


async def test_a_file_neither_described_nor_dicom_is_a_permanent_failure(tmp_path: Path) -> None:
    world = World(tmp_path)
    world.upload(described=False)
    world.ig_bucket.put(world.keys[0], b"not DICOM at all")

    with pytest.raises(InvalidDicom):
        await handle(world.request, world.deps)

    assert world.publisher.published == []


async def test_with_regroup_each_file_goes_to_discovery_with_the_requests_ae_titles(tmp_path: Path) -> None:
    world = World(tmp_path, regroup=True)
    world.upload()
    request = fixture("0.3")

    await handle(request, world.deps)

    arrivals = world.arrivals()
    assert [event.file.key for event, _ in arrivals] == world.keys
    assert len({message_id for _, message_id in arrivals} - {None}) == 2, "a stable id per file"
    origins = {(event.calling_ae_title, event.called_ae_title) for event, _ in arrivals}
    assert origins == {("MODALITY", "MONAI-MIP")}
    assert {tuple(event.application_ids) for event, _ in arrivals} == {("mip",)}
    assert world.buckets() == []


async def test_an_object_store_outage_propagates_for_a_retry(tmp_path: Path) -> None:
    world = World(tmp_path)
    world.upload()
    world.store.fail_next()

    with pytest.raises(TransientError):
        await handle(world.request, world.deps)

    assert world.publisher.published == []
