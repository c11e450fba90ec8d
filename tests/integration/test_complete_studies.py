"""Complete studies, end to end: the gateway, every consumer and dcmtk's storescp as the PACS.

A modality's study runs the application once, on the whole study, whatever happens on the way: an
association aborted and resent, a study resent after its job ran (RabbitMQ or the S3 server restarted while
it is sent: tests/faults/test_gateway_outages.py, on the fault suite's own stack). pynetdicom's SCU aborts
an association (dcmtk's storescu cannot be told to abort midway); storescu sends everything else.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

from consumers import discovery, exporter, monitor, scheduler
from devkit.dicom import GeneratedStudy, write_ct_study
from devkit.peers import LOCALHOST, StoreSCP, astorescu, free_port
from devkit.pipeline import consumers_running, mip_application, register, wait_until_consuming
from devkit.services import wait_for
from producers.gateway import Gateway, serving
from schemas.applications import SinkDefinition
from schemas.events import BucketReady, Event, ExportCompleted, JobFinished
from tests.faults.harness import DurableTap, durable_tap
from tests.integration.test_gateway_spool import send_raw
from wm.adapters.mongo import Database
from wm.config import Settings
from wm.registry import Registry
from wm.runtime import Consumer
from wm.stores.jobs import JobStore

pytestmark = pytest.mark.integration

E = TypeVar("E", bound=Event)
AET = "MWM-MIP"
QUIET_S = 2.0
GRACE_S = 6.0
SETTLE_S = QUIET_S * 3 + 2
"""Long enough for a second bucket (a duplicate job) to close and its job to start, if one were coming."""


@dataclass
class Stack:
    settings: Settings
    gateway: Gateway
    tap: DurableTap
    pacs: StoreSCP

    def of(self, kind: type[E]) -> list[E]:
        """The ``kind`` events seen, once each (a broker restart may redeliver one)."""
        unique = {t.message_id: t.event for t in self.tap.seen if isinstance(t.event, kind)}
        return list(unique.values())

    async def send(self, files: list[Path]) -> None:
        host, port = self.gateway.address
        result = await astorescu(host, port, AET, files, calling_aet="CT", timeout=120)
        assert result.returncode == 0, result.stderr

    async def jobs(self, count: int, timeout: float = 90) -> list[JobFinished]:
        """Wait for ``count`` finished jobs and their exports."""
        for kind in (JobFinished, ExportCompleted):

            async def enough(kind: type[Event] = kind) -> bool:
                return len(self.of(kind)) >= count

            await wait_for(enough, timeout, f"{count} {kind.event_type}")
        return self.of(JobFinished)


@asynccontextmanager
async def stack(settings: Settings, work: Path) -> AsyncIterator[Stack]:
    settings = settings.model_copy(
        update={
            "gateway": settings.gateway.model_copy(
                update={"host": LOCALHOST, "port": free_port(), "abort_grace_s": GRACE_S}
            )
        }
    )
    keys = (BucketReady.event_type, JobFinished.event_type, ExportCompleted.event_type)
    consumers: list[Consumer[Any]] = [
        discovery.CONSUMER,
        scheduler.CONSUMER,
        monitor.CONSUMER,
        exporter.CONSUMER,
    ]
    async with StoreSCP(work / "pacs", aet="PACS") as pacs:
        async with Database(settings.mongo) as database:
            sink = {
                "name": "pacs",
                "type": "dicom",
                "args": {"ae_title": "PACS", "host": LOCALHOST, "port": pacs.port},
            }
            await Registry(database).sinks.create(SinkDefinition.model_validate(sink))
        await register(settings, mip_application(quiet_period_s=QUIET_S, sinks=["pacs"]))
        async with (
            durable_tap(settings, keys) as events,
            consumers_running(settings, consumers),
            serving(settings) as (gateway, _),
        ):
            await wait_until_consuming(settings, consumers)  # before a test stops the broker
            yield Stack(settings, gateway, events, pacs)


def ct(work: Path, slices: int, seed: int) -> GeneratedStudy:
    return write_ct_study(
        work / f"study-{seed}", series=1, slices_per_series=slices, rows=32, columns=32, seed=seed
    )


async def job_record(settings: Settings, job_id: str) -> bool:
    async with Database(settings.mongo) as database:
        return (await JobStore(database).get(job_id)).possibly_incomplete


async def test_an_association_aborted_after_40_of_150_then_resent_runs_one_job_on_150(
    live_settings: Settings, tmp_path: Path
) -> None:
    study = ct(tmp_path, 150, seed=62)
    async with stack(live_settings, tmp_path) as mwm:
        statuses = await asyncio.to_thread(send_raw, mwm.gateway.address, study.files, 40, AET)
        assert len(statuses) == 40
        await mwm.send(study.files)
        [finished] = await mwm.jobs(1)
        await asyncio.sleep(GRACE_S + SETTLE_S)  # the aborted association's grace period ends: no second job
        assert len(mwm.of(JobFinished)) == 1
        [ready] = mwm.of(BucketReady)
        assert len(ready.files) == 150 and not ready.possibly_incomplete
        assert not await job_record(mwm.settings, finished.job_id)
        assert len(mwm.pacs.received_files()) == 1


async def test_an_association_aborted_and_not_resent_runs_after_the_grace_period_marked_incomplete(
    live_settings: Settings, tmp_path: Path
) -> None:
    study = ct(tmp_path, 150, seed=63)
    async with stack(live_settings, tmp_path) as mwm:
        await asyncio.to_thread(send_raw, mwm.gateway.address, study.files, 40, AET)
        await asyncio.sleep(GRACE_S * 0.6)
        assert mwm.of(BucketReady) == [], "the bucket waits for the retry"
        [finished] = await mwm.jobs(1)
        [ready] = mwm.of(BucketReady)
        assert len(ready.files) == 40 and ready.possibly_incomplete
        assert await job_record(mwm.settings, finished.job_id), "the job record says possibly incomplete"


async def test_a_study_resent_after_its_job_ran_runs_again_only_with_new_instances_and_then_whole(
    live_settings: Settings, tmp_path: Path
) -> None:
    study = ct(tmp_path, 12, seed=64)
    first, new = study.files[:10], study.files[10:]
    async with stack(live_settings, tmp_path) as mwm:
        await mwm.send(first)
        await mwm.jobs(1)
        await mwm.send(first)  # the same study again: no new instance
        await asyncio.sleep(SETTLE_S)
        assert len(mwm.of(JobFinished)) == 1, "a resent study with nothing new does not run again"
        await mwm.send([*first, *new])  # with two new instances
        await mwm.jobs(2)
        await asyncio.sleep(SETTLE_S)
        assert len(mwm.of(JobFinished)) == 2
        second = mwm.of(BucketReady)[-1]
        assert len(second.files) == 12, "the second job runs on the whole study"
