"""Fault injection on the real services: studies flow through discovery, scheduler, monitor and exporter
(each its own process) to a dcmtk storescp while every consumer type is killed with SIGKILL once and
restarted, and RabbitMQ, the MongoDB-wire server and the S3 server are each restarted once.

Every study must end in exactly one job and one export, or an explicit failure (``job.finished`` failed,
``export.completed`` failed); nothing lost, nothing duplicated (files at the sink per study). The counts
are printed as a table (``pytest -s``, or in the report of a failure).

This stops and starts services: run it only on a stack of its own, ``scripts/faults`` (which uses
``MWM_SERVICES_PORT_OFFSET``, so the services others use on this machine are left alone).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import aio_pika
import pytest

from devkit.dicom import GeneratedStudy, write_ct_study
from devkit.peers import StoreSCP
from devkit.pipeline import arrive, mip_application, register
from devkit.services import services_command, settings_env, wait_for
from schemas.applications import SinkDefinition
from schemas.events import (
    BucketReady,
    Event,
    ExportCompleted,
    ExportRequested,
    JobFinished,
    JobLaunched,
    PayloadArrived,
)
from tests.faults.harness import (
    CONSUMERS,
    FINAL_EXPORT,
    FINAL_JOB,
    DurableTap,
    Fleet,
    Snapshot,
    account,
    durable_tap,
    queue_depths,
    received_at_sink,
    snapshot,
)
from wm.adapters.mongo import Database
from wm.adapters.rabbitmq import queue_name
from wm.config import MongoSettings, RetrySettings, Settings
from wm.registry import Registry

STUDIES = 12
SLICES = 3
SEND_INTERVAL_S = 3.0  # studies arrive spread over the run
QUIET_PERIOD_S = 2.0
CONSUMER_OUTAGE_S = 1.0  # between a kill -9 and the restart
TRIGGER_TIMEOUT_S = 30.0  # a fault waits this long for the event it aims at, then strikes anyway
SETTLE_TIMEOUT_S = 120.0  # after the last fault: every study ends by then
AE_TITLE = "MWM-FAULTS"
TAPPED = ("mwm.payload.arrived", "mwm.bucket.ready", "mwm.job.launched", "mwm.job.finished", "mwm.export.#")


def fault_settings(settings: Settings, work_dir: Path) -> Settings:
    """The test's own names, with production retries and timeouts (the tests' short ones would turn every
    outage into a failure), short leases (so a killed holder's work is taken over within the run) and
    JSON logs."""
    return settings.model_copy(
        update={
            "work_dir": str(work_dir),
            "retry": RetrySettings(),
            "mongo": settings.mongo.model_copy(update={"timeout_ms": MongoSettings().timeout_ms}),
            "export": settings.export.model_copy(update={"lease_s": 15.0}),
            "monitor": settings.monitor.model_copy(update={"finish_lease_s": 10.0}),
            "discovery": settings.discovery.model_copy(update={"publish_lease_s": 5.0}),
            "observability": settings.observability.model_copy(update={"log_format": "json"}),
        }
    )


@dataclass
class Run:
    """The moving parts of one fault run."""

    settings: Settings
    fleet: Fleet
    tap: DurableTap
    ingest: asyncio.Lock  # held by a study's arrival, and by a service outage (the modality waits)
    log: list[str]

    def note(self, what: str) -> None:
        self.log.append(f"{time.strftime('%H:%M:%S')} {what}")


async def send_studies(run: Run, studies: list[GeneratedStudy]) -> None:
    """Send the studies one by one, ``SEND_INTERVAL_S`` apart, as a gateway would."""
    for study in studies:
        async with run.ingest:
            await arrive(run.settings, study.files, called_ae=AE_TITLE, payload_id=study.patient_id.lower())
            run.note(f"sent {study.patient_id} ({len(study.files)} files)")
        await asyncio.sleep(SEND_INTERVAL_S)


def kill(name: str) -> Callable[[Run], Awaitable[None]]:
    async def strike(run: Run) -> None:
        run.fleet.kill(name)
        run.note(f"kill -9 {name}")
        await asyncio.sleep(CONSUMER_OUTAGE_S)
        run.fleet.start(name)
        run.note(f"restarted {name}")

    return strike


def restart(service: str) -> Callable[[Run], Awaitable[None]]:
    async def strike(run: Run) -> None:
        async with run.ingest:
            run.note(f"restarting {service}")
            await asyncio.to_thread(services_command, "restart", service)
            run.note(f"restarted {service}")

    return strike


# Each fault strikes right after the event that puts work in front of its target.
FAULTS: tuple[tuple[type[Event], Callable[[Run], Awaitable[None]]], ...] = (
    (PayloadArrived, kill("discovery")),
    (PayloadArrived, restart("mongo")),
    (BucketReady, kill("scheduler")),
    (BucketReady, restart("s3")),
    (JobLaunched, kill("monitor")),
    (JobLaunched, restart("rabbitmq")),
    (ExportRequested, kill("exporter")),
)


async def inject_faults(run: Run) -> None:
    for trigger, strike in FAULTS:
        if not await run.tap.next(trigger, TRIGGER_TIMEOUT_S):
            run.note(f"no {trigger.__name__} within {TRIGGER_TIMEOUT_S}s; striking anyway")
        await strike(run)
        await asyncio.sleep(1.0)  # let the pipeline move before the next fault


def settled(studies: list[str], state: Snapshot, tap: DurableTap) -> bool:
    """Every study has a job, every job ended and said so, every export ended and said so."""
    studies_with_jobs = set(state.jobs_of_study())
    finished = {e.job_id for e in tap.of(JobFinished)}
    completed = {e.export_task_id for e in tap.of(ExportCompleted)}
    return (
        studies_with_jobs >= set(studies)
        and all(job["state"] in FINAL_JOB and job["_id"] in finished for job in state.jobs)
        and all(task["state"] in FINAL_EXPORT and task["_id"] in completed for task in state.exports)
        and all(
            job["_id"] in {t["job_id"] for t in state.exports}
            for job in state.jobs
            if job["state"] == "succeeded"
        )
    )


async def add_sink(settings: Settings, scp: StoreSCP) -> None:
    sink = SinkDefinition.model_validate(
        {"name": "pacs", "type": "dicom", "args": {"ae_title": scp.aet, "host": scp.host, "port": scp.port}}
    )
    async with Database(settings.mongo) as database:
        await Registry(database).sinks.create(sink)


@pytest.mark.timeout(300)
async def test_every_study_ends_once_through_kills_and_service_restarts(
    live_settings: Settings, tmp_path: Path
) -> None:
    settings = fault_settings(live_settings, tmp_path / "work")
    studies = [
        write_ct_study(
            tmp_path / f"study{i}",
            slices_per_series=SLICES,
            rows=64,
            columns=64,
            patient_id=f"FAULT-{i:02d}",
            seed=i,
        )
        for i in range(STUDIES)
    ]
    uids = [study.study_uid for study in studies]
    fleet = Fleet(settings_env(settings), tmp_path / "logs")
    started = time.monotonic()
    # +uf: a unique file name per C-STORE, so a study exported twice shows as twice the files.
    async with StoreSCP(tmp_path / "sink", aet="PACS", extra_args=["--fork", "+uf"]) as scp:
        await add_sink(settings, scp)
        await register(
            settings, mip_application(ae_title=AE_TITLE, quiet_period_s=QUIET_PERIOD_S, sinks=["pacs"])
        )
        async with durable_tap(settings, TAPPED) as tap:
            run = Run(settings, fleet, tap, asyncio.Lock(), [])
            await _run_with_faults(run, studies)
            state = await snapshot(settings)
            depths = await queue_depths(settings)
        at_sink = received_at_sink(scp.received_files())
    result = account(uids, state, tap, at_sink)
    left = {name: count for name, count in depths.items() if count}
    report = "\n".join(
        [
            f"fault run: {time.monotonic() - started:.0f}s; consumer logs in {fleet.logs}",
            *run.log,
            *(f"consumer exited by itself (restarted): {crash}" for crash in fleet.crashes),
            result.table(),
            *(f"explicit failure: {failure}" for failure in result.failures),
            f"messages left in queues: {left}",
            *result.problems,
        ]
    )
    print("\n" + report)
    assert not result.problems, report
    # Dead letters record the explicit failures; nothing else may be left waiting.
    assert all(name.endswith(".dead-letter") for name in left), report


async def _run_with_faults(run: Run, studies: list[GeneratedStudy]) -> None:
    """Start the consumers, send the studies while the faults strike, wait until every study ended."""
    stop = asyncio.Event()
    for name in CONSUMERS:
        run.fleet.start(name)
    supervisor = asyncio.create_task(run.fleet.supervise(stop))
    try:
        await _queues_declared(run.settings)
        await asyncio.gather(send_studies(run, studies), inject_faults(run))
        await _settle([study.study_uid for study in studies], run.settings, run.tap, run)
    finally:
        stop.set()
        await supervisor
        run.fleet.stop()


async def _queues_declared(settings: Settings) -> None:
    connection = await aio_pika.connect(settings.bus.url)
    async with connection:
        for name in CONSUMERS:

            async def declared(queue: str = queue_name(settings.bus, name)) -> bool:
                channel = await connection.channel()
                try:
                    await channel.declare_queue(queue, passive=True)
                    return True
                except aio_pika.exceptions.ChannelClosed:
                    return False

            await wait_for(declared, 30, f"queue of {name}", interval=0.2)


async def _settle(uids: list[str], settings: Settings, tap: DurableTap, run: Run) -> None:
    """Wait until every study ended (bounded); on time-out the accounting says what is missing."""

    async def done() -> bool:
        return settled(uids, await snapshot(settings), tap)

    try:
        await wait_for(done, SETTLE_TIMEOUT_S, "every study to end", interval=0.5)
        run.note("settled")
    except AssertionError as exc:
        run.note(str(exc))
