"""The discovery handler on fakes: which buckets a file joins, redelivery, unmatched files, outages."""

from __future__ import annotations

import pytest
from prometheus_client import REGISTRY

from consumers.discovery import DiscoveryDeps, handle
from tests.unit.builders import application, candidate, payload_arrived
from tests.unit.fakes import FakeBuckets, FakeCatalog, FakeTimers
from wm.domain.discovery import Candidate
from wm.errors import TransientError


def deps(*candidates: Candidate) -> tuple[DiscoveryDeps, FakeCatalog, FakeBuckets, FakeTimers]:
    catalog, buckets, timers = FakeCatalog(*candidates), FakeBuckets(), FakeTimers()
    return DiscoveryDeps(catalog, buckets, timers), catalog, buckets, timers


def unmatched(called_ae: str) -> float:
    return REGISTRY.get_sample_value("mwm_unmatched_files_total", {"called_ae": called_ae}) or 0.0


async def test_a_file_joins_the_bucket_of_each_application_that_wants_it_and_arms_its_timer() -> None:
    ct_only = application("ct-seg", discovery={"filters": {"modalities": ["ct"]}})
    mr_only = application("mr-seg", discovery={"filters": {"modalities": ["MR"]}})
    by_series = application("series", discovery={"grouping_tag": "0020,000E", "quiet_period_s": 30})
    wiring, _, buckets, timers = deps(candidate(ct_only), candidate(mr_only), candidate(by_series))

    await handle(payload_arrived(study_uid="1.2.3"), wiring)

    joined = {b.bucket_id: b for b in buckets.buckets.values()}
    assert sorted(bucket_id.split(".")[0] for bucket_id in joined) == ["ct-seg", "series"]
    assert timers.armed == {bucket_id: bucket.closes_at for bucket_id, bucket in joined.items()}


async def test_a_redelivered_file_adds_nothing_and_arms_the_same_timer() -> None:
    wiring, _, buckets, timers = deps(candidate(application()))
    event = payload_arrived()

    await handle(event, wiring)
    armed = dict(timers.armed)
    await handle(event, wiring)

    [bucket] = buckets.buckets.values()
    assert len(bucket.files) == 1
    assert timers.armed.keys() == armed.keys()


async def test_files_of_one_study_share_a_bucket_and_another_study_opens_its_own() -> None:
    wiring, _, buckets, _ = deps(candidate(application()))

    for event in (payload_arrived(study_uid="1.2.3"), payload_arrived(study_uid="1.2.3"), payload_arrived()):
        await handle(event, wiring)

    assert sorted(len(b.files) for b in buckets.buckets.values()) == [1, 2]


async def test_a_file_nothing_wants_is_counted_and_bucketed_nowhere() -> None:
    mr_only = application(discovery={"filters": {"modalities": ["MR"]}})
    wiring, _, buckets, timers = deps(candidate(mr_only))
    before = unmatched("UNMATCHED")

    await handle(payload_arrived(called_ae="UNMATCHED"), wiring)

    assert buckets.buckets == {} and timers.armed == {}
    assert unmatched("UNMATCHED") == before + 1


async def test_a_catalog_outage_reaches_the_runtime_and_changes_nothing() -> None:
    wiring, catalog, buckets, timers = deps(candidate(application()))
    catalog.fail_next()

    with pytest.raises(TransientError):
        await handle(payload_arrived(), wiring)

    assert buckets.buckets == {} and timers.armed == {}


async def test_a_store_outage_arms_no_timer_and_the_retry_places_the_file_once() -> None:
    wiring, _, buckets, timers = deps(candidate(application()))
    event = payload_arrived()
    buckets.fail_next()

    with pytest.raises(TransientError):
        await handle(event, wiring)
    assert timers.armed == {}
    await handle(event, wiring)

    [bucket] = buckets.buckets.values()
    assert len(bucket.files) == 1 and list(timers.armed) == [bucket.bucket_id]
