"""Discovery on the real services: grouping into buckets, quiet periods, replicas, restarts."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

from consumers import discovery
from schemas.events import BucketReady
from tests.support.pipeline import arrive, consumers_running, mip_application, register, tap
from tests.support.services import consumer_processes
from wm.adapters.rabbitmq import Bus
from wm.config import Settings
from wm.testing.dicom import write_ct_study

QUIET = 1.0


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
        await asyncio.sleep(QUIET * 2)  # any extra bucket.ready would arrive within this
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
        await asyncio.sleep(QUIET * 0.4)
        await arrive(settings, study.files[2:4], called_ae="MWM-MIP")
        [together] = await events.wait_for(BucketReady, 1, 20)
        await asyncio.sleep(QUIET * 1.5)
        await arrive(settings, study.files[4:], called_ae="MWM-MIP")
        ready = await events.wait_for(BucketReady, 2, 20)
    assert len(together.files) == 4
    assert len(ready[1].files) == 2
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
            await asyncio.sleep(QUIET * 3)
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
            await asyncio.sleep(1.5)  # the files are bucketed; the quiet period is still running
            owner.send_signal(signal.SIGKILL)
            owner.wait(timeout=10)
        assert events.of(BucketReady) == []
        with consumer_processes(settings, "discovery", count=2):
            await events.wait_for(BucketReady, 1, 30)
            await asyncio.sleep(3.0)
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
        await asyncio.sleep(QUIET * 2.5)
    assert events.of(BucketReady) == []
