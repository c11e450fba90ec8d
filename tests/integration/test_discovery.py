"""Discovery on the real services: grouping into buckets, quiet periods, replicas, restarts."""

from __future__ import annotations

import signal
from datetime import timedelta
from pathlib import Path

from consumers import discovery
from devkit.dicom import write_ct_study
from devkit.events import payload_arrived
from devkit.pipeline import EventTap, arrive, consumers_running, mip_application, register, tap
from devkit.services import consumer_processes, queue_settled, wait_for
from schemas.events import BucketReady
from wm.adapters.mongo import Database
from wm.adapters.rabbitmq import Bus, queue_name
from wm.config import Settings
from wm.domain.discovery import Placement, file_id
from wm.stores import buckets
from wm.stores.buckets import BucketStore, Closing

QUIET = 1.0


async def settled(settings: Settings, events: EventTap) -> None:
    """Wait until no further ``bucket.ready`` can come and every one published has reached ``events``.

    Every file handled (discovery's queue empty), every bucket closed and its closure published (a
    ``bucket.ready`` is only ever published for a closure), then the tap's queue drained.
    """
    await queue_settled(queue_name(settings.bus, discovery.NAME))
    async with Database(settings.mongo) as database:

        async def closed_and_published() -> bool:
            open_buckets = await database.collection(buckets.BUCKETS).count_documents({"state": "open"})
            unpublished = await database.collection(buckets.CLOSURES).count_documents({"published_at": None})
            return open_buckets == 0 and unpublished == 0

        await wait_for(closed_and_published, 30, "every bucket closed and its bucket.ready published")
    await queue_settled(events.queue)


async def bucketed(settings: Settings, files: int) -> None:
    """Wait until ``files`` files are in buckets."""
    async with Database(settings.mongo) as database:

        async def enough() -> bool:
            return await database.collection(buckets.FILES).count_documents({}) >= files

        await wait_for(enough, 30, f"{files} files in buckets")


async def test_a_multi_series_study_makes_one_bucket_and_interleaved_studies_make_two(
    live_settings: Settings, tmp_path: Path
) -> None:
    settings = live_settings
    await register(settings, mip_application(quiet_period_s=QUIET))
    first = write_ct_study(tmp_path / "a", series=2, slices_per_series=3, seed=1)
    second = write_ct_study(tmp_path / "b", series=1, slices_per_series=3, seed=2, patient_id="OTHER")
    interleaved = [f for pair in zip(first.files, second.files + second.files, strict=False) for f in pair]
    interleaved = list(dict.fromkeys(interleaved + first.files))
    async with (
        tap(settings, BucketReady.event_type) as events,
        consumers_running(settings, [discovery.CONSUMER]),
    ):
        await arrive(settings, interleaved, called_ae="MWM-MIP")
        ready = await events.wait_for(BucketReady, 2, 20)
        await settled(settings, events)
    assert len(events.of(BucketReady)) == 2
    by_study = {event.grouping_value: event for event in ready}
    assert len(by_study[first.study_uid].files) == 6
    assert len(by_study[second.study_uid].files) == 3
    assert {f.dicom.series_instance_uid for f in by_study[first.study_uid].files} == set(first.series_uids)


async def test_two_associations_within_the_quiet_period_make_one_bucket_and_a_longer_gap_two(
    live_settings: Settings, tmp_path: Path
) -> None:
    settings = live_settings
    await register(settings, mip_application(quiet_period_s=QUIET))
    study = write_ct_study(tmp_path / "s", series=1, slices_per_series=6, seed=3)
    async with (
        tap(settings, BucketReady.event_type) as events,
        consumers_running(settings, [discovery.CONSUMER]),
    ):
        await arrive(settings, study.files[:2], called_ae="MWM-MIP")
        await bucketed(
            settings, 2
        )  # the bucket is open: the next association joins it within its quiet period
        await arrive(settings, study.files[2:4], called_ae="MWM-MIP")
        [together] = await events.wait_for(BucketReady, 1, 20)
        await arrive(settings, study.files[4:], called_ae="MWM-MIP")  # after the bucket closed
        ready = await events.wait_for(BucketReady, 2, 20)
    assert len(together.files) == 4
    assert len(ready[1].files) == 6, "new instances after a run: the next runs on the whole study"
    assert ready[0].bucket_id != ready[1].bucket_id
    assert ready[1].bucket_id.endswith(".g2"), "a file after the bucket closed opens the next generation"


async def test_two_replicas_and_duplicate_events_still_publish_one_bucket_ready_per_bucket(
    live_settings: Settings, tmp_path: Path
) -> None:
    settings = live_settings
    await register(settings, mip_application(quiet_period_s=QUIET))
    study = write_ct_study(tmp_path / "s", series=2, slices_per_series=5, seed=4)
    async with (
        tap(settings, BucketReady.event_type) as events,
        consumers_running(settings, [discovery.CONSUMER]),
    ):
        with consumer_processes(settings, "discovery", count=1):
            events_sent = await arrive(settings, study.files, called_ae="MWM-MIP")
            await arrive(settings, study.files, called_ae="MWM-MIP", payload_id=events_sent[0].payload_id)
            await events.wait_for(BucketReady, 1, 30)
            await settled(settings, events)
    [ready] = events.of(BucketReady)
    assert len(ready.files) == len(study.files)
    assert len({f.file.key for f in ready.files}) == len(study.files)


async def test_bucket_ready_is_published_once_after_the_timer_owner_is_killed_in_the_quiet_period(
    live_settings: Settings, tmp_path: Path
) -> None:
    settings = live_settings
    await register(settings, mip_application(quiet_period_s=3.0))
    study = write_ct_study(tmp_path / "s", series=1, slices_per_series=4, seed=5)
    async with Bus(settings.bus) as bus:
        await bus.declare_consumer_queue(bus.channel, "discovery", discovery.CONSUMER.routing_keys)
    async with tap(settings, BucketReady.event_type) as events:
        with consumer_processes(settings, "discovery", count=1) as [owner]:
            await arrive(settings, study.files, called_ae="MWM-MIP")
            await bucketed(settings, len(study.files))  # the quiet period (3 s) is still running
            owner.send_signal(signal.SIGKILL)
            owner.wait(timeout=10)
        assert events.of(BucketReady) == []
        with consumer_processes(settings, "discovery", count=2):
            await events.wait_for(BucketReady, 1, 30)
            await settled(settings, events)
    [ready] = events.of(BucketReady)
    assert len(ready.files) == 4


async def test_a_file_no_application_wants_is_acknowledged_not_requeued(
    live_settings: Settings, tmp_path: Path
) -> None:
    settings = live_settings
    await register(settings, mip_application(quiet_period_s=QUIET))
    study = write_ct_study(tmp_path / "s", series=1, slices_per_series=2, seed=6, modality="MR")
    async with (
        tap(settings, BucketReady.event_type) as events,
        consumers_running(settings, [discovery.CONSUMER]),
    ):
        await arrive(settings, study.files, called_ae="MWM-MIP")
        await arrive(settings, study.files, called_ae="NOBODY")
        await settled(settings, events)
        async with Database(settings.mongo) as database:
            assert await database.collection(buckets.BUCKETS).count_documents({}) == 0
    assert events.of(BucketReady) == []


PLACEMENT = Placement("mip", 1, "0020,000D", "1.2.3.4", 0.2)


async def test_a_replica_whose_open_generation_hint_is_stale_puts_the_next_file_in_the_next_generation(
    live_settings: Settings,
) -> None:
    async with Database(live_settings.mongo, buckets.INDEXES) as database:
        first, second = BucketStore(database), BucketStore(database)
        early = await first.add_file(PLACEMENT, payload_arrived(study_uid="1.2.3.4"))
        closing = await second.close(early.bucket_id, early.closes_at + timedelta(seconds=1))
        assert closing.closed and closing.event is not None
        late = await first.add_file(PLACEMENT, payload_arrived(study_uid="1.2.3.4"))
    assert late.bucket_id == PLACEMENT.bucket_id(2), "the hint said g1 was open; its closure says otherwise"
    assert len(closing.event.files) == 1


async def test_a_closer_that_died_after_sealing_is_succeeded_by_a_republish_of_the_same_event(
    live_settings: Settings,
) -> None:
    async with Database(live_settings.mongo, buckets.INDEXES) as database:
        store = BucketStore(database)
        joined = [await store.add_file(PLACEMENT, payload_arrived(study_uid="1.2.3.4")) for _ in range(3)]
        now = max(j.closes_at for j in joined) + timedelta(seconds=1)
        closing = await store.close(joined[0].bucket_id, now)
        assert await store.close(joined[0].bucket_id, now) == Closing(), "closed once"
        [(bucket_id, republished)] = await BucketStore(database).unpublished(timedelta(0), now)
    assert bucket_id == joined[0].bucket_id
    assert closing.event is not None and republished == closing.event


async def test_a_file_that_won_its_contest_before_the_seal_is_left_out_of_the_bucket(
    live_settings: Settings,
) -> None:
    async with Database(live_settings.mongo, buckets.INDEXES) as database:
        store = BucketStore(database)
        kept = payload_arrived(study_uid="1.2.3.4")
        moved = payload_arrived(study_uid="1.2.3.4")
        joined = [await store.add_file(PLACEMENT, event) for event in (kept, moved)]
        # the late file saw the closure first and won the contest (a replica between its W1 and its move)
        memberships = database.collection(buckets.MEMBERSHIPS)
        fid = file_id(PLACEMENT, moved)
        bucket_id = joined[0].bucket_id
        await memberships.insert_one(
            {
                "_id": buckets.membership_id(fid, bucket_id),
                "bucket_id": bucket_id,
                "file_id": fid,
                "winner": "file",
            }
        )
        closing = await store.close(bucket_id, max(j.closes_at for j in joined) + timedelta(seconds=1))
    assert closing.event is not None
    assert [f.file.key for f in closing.event.files] == [kept.file.key]
