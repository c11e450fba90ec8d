"""The exporter on the real services, sending to real DICOM receivers (dcmtk storescp, Orthanc).

A "job's outputs" are generated CT files put in the object store by the test; the exporter consumer runs in
this process (``run_consumers`` with a stop event); ``export.completed`` is read from a test queue bound to
``mwm.export.completed`` on the test's own exchange.
"""

from __future__ import annotations

import asyncio
import io
import json
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aio_pika
import pydicom

from consumers import exporter
from devkit.dicom import write_ct_study
from devkit.peers import LOCALHOST, Orthanc, StoreSCP, free_port
from devkit.services import wait_for
from schemas.applications import SinkDefinition
from schemas.events import ExportCompleted, ExportRequested, FileExportResult, FileRef, SinkRef, utc_now
from wm.adapters.mongo import Database
from wm.adapters.objectstore import ObjectStore
from wm.adapters.rabbitmq import Bus
from wm.config import Settings
from wm.domain.exports import ExportState, task_for
from wm.registry.models import PageRequest
from wm.registry.sinks import Sinks
from wm.runtime import open_services, run_consumers
from wm.stores.exports import ExportTasks


def with_export(settings: Settings, **values: Any) -> Settings:
    return settings.model_copy(update={"export": settings.export.model_copy(update=values)})


@asynccontextmanager
async def running_exporter(settings: Settings) -> AsyncIterator[None]:
    """The exporter consumer in this process until the block ends (its queue exists on entry)."""
    async with Bus(settings.bus) as bus:
        await bus.declare_consumer_queue(bus.channel, exporter.NAME, exporter.ROUTING_KEYS)
    stop = asyncio.Event()
    task = asyncio.create_task(run_consumers(settings, [exporter.CONSUMER], stop=stop))
    try:
        yield
    finally:
        stop.set()
        await task


class Completions:
    """``export.completed`` events, from a queue bound on the test's exchange."""

    def __init__(self) -> None:
        self.events: list[ExportCompleted] = []
        self.message_ids: list[str] = []

    async def on_message(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        async with message.process():
            self.events.append(ExportCompleted.model_validate(json.loads(message.body)))
            self.message_ids.append(str(message.message_id))

    async def wait(self, count: int) -> list[ExportCompleted]:
        async def enough() -> bool:
            return len(self.events) >= count

        await wait_for(enough, 60, f"{count} export.completed event(s)")
        return self.events


@asynccontextmanager
async def completions(settings: Settings) -> AsyncIterator[Completions]:
    connection = await aio_pika.connect(settings.bus.url)
    async with connection:
        channel = await connection.channel()
        exchange = await channel.declare_exchange(
            settings.bus.exchange, aio_pika.ExchangeType.TOPIC, durable=True
        )
        queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        await queue.bind(exchange, routing_key=ExportCompleted.event_type)
        seen = Completions()
        await queue.consume(seen.on_message)
        yield seen


async def job_outputs(settings: Settings, directory: Path, slices: int = 4) -> list[FileRef]:
    """A generated CT series uploaded under a job's output prefix, plus a non-DICOM report."""
    study = write_ct_study(directory, slices_per_series=slices, seed=int(uuid.uuid4().int % 10**6))
    report = directory / "report.txt"
    report.write_text("not for PACS")
    async with ObjectStore(settings.object_store) as objects:
        refs = [await objects.put_file(f"jobs/job-1/outputs/{p.name}", p) for p in study.files]
        refs.append(await objects.put_file("jobs/job-1/outputs/report.txt", report, "text/plain"))
    return refs


async def add_sink(settings: Settings, name: str, port: int, ae_title: str) -> None:
    definition = SinkDefinition.model_validate(
        {"name": name, "type": "dicom", "args": {"ae_title": ae_title, "host": LOCALHOST, "port": port}}
    )
    async with Database(settings.mongo) as database:
        await Sinks(database).create(definition)


def request(sink: str, files: list[FileRef], job_id: str = "job-1") -> ExportRequested:
    return ExportRequested(
        correlation_id=f"corr-{job_id}",
        export_task_id=f"{job_id}.{sink}",
        job_id=job_id,
        application_id="seg",
        sink=SinkRef(name=sink, type="dicom"),
        files=files,
    )


async def publish(settings: Settings, *events: ExportRequested, message_id: str | None = None) -> None:
    async with Bus(settings.bus) as bus:
        for event in events:
            await bus.publish(event, message_id=message_id)


async def task_state(settings: Settings, task_id: str) -> ExportState:
    async with Database(settings.mongo) as database:
        return (await ExportTasks(database).get(task_id)).state


def pixels_by_sop(datasets: Sequence[pydicom.Dataset]) -> dict[str, bytes]:
    return {str(ds.SOPInstanceUID): bytes(ds.PixelData) for ds in datasets}


async def test_job_outputs_arrive_at_storescp_and_orthanc_with_identical_pixels(
    live_settings: Settings, tmp_path: Path
) -> None:
    files = await job_outputs(live_settings, tmp_path / "out", slices=6)
    originals = pixels_by_sop([pydicom.dcmread(p) for p in sorted((tmp_path / "out").rglob("*.dcm"))])
    async with StoreSCP(tmp_path / "scp", aet="STORESCP") as scp:
        with Orthanc(aet="ORTHANC") as orthanc:
            await add_sink(live_settings, "scp", scp.port, "STORESCP")
            await add_sink(live_settings, "orthanc", orthanc.dicom_port, "ORTHANC")
            async with completions(live_settings) as seen, running_exporter(live_settings):
                await publish(live_settings, request("scp", files), request("orthanc", files))
                events = await seen.wait(2)
            from_orthanc = [pydicom.dcmread(io.BytesIO(orthanc.get_file(i))) for i in orthanc.instances()]
        from_scp = [pydicom.dcmread(p) for p in scp.received_files()]
    outcomes = {e.export_task_id: e.status for e in events}
    assert outcomes == {"job-1.scp": "succeeded", "job-1.orthanc": "succeeded"}
    for event in events:
        statuses = {r.key.rsplit("/", 1)[-1]: r.status for r in event.file_results}
        assert statuses.pop("report.txt") == "skipped"
        assert set(statuses.values()) == {"succeeded"} and len(statuses) == 6
    assert pixels_by_sop(from_scp) == originals
    assert pixels_by_sop(from_orthanc) == originals
    assert await task_state(live_settings, "job-1.scp") is ExportState.succeeded


async def test_a_destination_that_stays_down_is_redelivered_until_its_window_ends_then_fails(
    live_settings: Settings, tmp_path: Path
) -> None:
    settings = with_export(
        live_settings,
        retry_attempts=3,
        retry_initial_delay_s=0.2,
        acse_timeout_s=2.0,
        redelivery_window_s=3.0,
        redelivery_initial_delay_s=0.5,
        redelivery_max_delay_s=1.0,
    )
    files = await job_outputs(settings, tmp_path / "out")
    await add_sink(settings, "down", free_port(), "NOBODY")
    async with completions(settings) as seen, running_exporter(settings):
        started = time.monotonic()
        await publish(settings, request("down", files))
        [event] = await seen.wait(1)
        elapsed = time.monotonic() - started
    assert event.status == "failed" and event.export_task_id == "job-1.down"
    errors = {r.error or "" for r in event.file_results if r.status == "failed"}
    error = errors.pop()
    assert not errors and "gave up after 3 attempts" in error and "after the redelivery window" in error
    assert elapsed >= 3.0, "redelivered (after backoff delays) until the redelivery window was over"
    async with Database(settings.mongo) as database:
        task = await ExportTasks(database).get("job-1.down")
    assert task.state is ExportState.failed and task.retries >= 1


async def test_a_rejected_association_fails_at_once_without_retries(
    live_settings: Settings, tmp_path: Path
) -> None:
    settings = with_export(live_settings, retry_attempts=5, retry_initial_delay_s=3.0)
    files = await job_outputs(settings, tmp_path / "out")
    async with StoreSCP(tmp_path / "scp", aet="STORESCP", refuse=True) as scp:
        await add_sink(settings, "refusing", scp.port, "STORESCP")
        async with completions(settings) as seen, running_exporter(settings):
            started = time.monotonic()
            await publish(settings, request("refusing", files))
            [event] = await seen.wait(1)
            elapsed = time.monotonic() - started
        log = scp.log()
    assert event.status == "failed"
    errors = [r.error or "" for r in event.file_results if r.status == "failed"]
    assert len(errors) == 4 and all("association rejected" in error for error in errors)
    assert elapsed < 3.0, f"took {elapsed:.1f} s: a retry would have waited 3 s first"
    # The readiness probe of StoreSCP (a bare TCP connect) shows up as a received association whose
    # rejection "failed"; every other received association is one attempt of the exporter.
    assert log.count("Association Received") - log.count("Association Reject Failed") == 1, log


async def test_duplicate_requests_export_once_and_complete_once(
    live_settings: Settings, tmp_path: Path
) -> None:
    files = await job_outputs(live_settings, tmp_path / "out")
    event = request("scp", files)
    async with StoreSCP(tmp_path / "scp", aet="STORESCP", extra_args=["--fork"]) as scp:
        await add_sink(live_settings, "scp", scp.port, "STORESCP")
        async with completions(live_settings) as seen, running_exporter(live_settings):
            await publish(live_settings, event, message_id="first")
            await publish(live_settings, event, message_id="second")  # concurrent with the first
            await seen.wait(1)
            await publish(live_settings, event, message_id="third")  # after the task is final
            await wait_handled(live_settings, "first", "second", "third")
        log = scp.log()
    assert len(seen.events) == 1 and seen.message_ids == ["job-1.scp.completed"]
    assert log.count("Received Store Request") == 4, log


async def wait_handled(settings: Settings, *message_ids: str) -> None:
    async with Database(settings.mongo) as database:
        collection = database.collection("processed_messages")

        async def handled() -> bool:
            keys = [f"{exporter.NAME}:{message_id}" for message_id in message_ids]
            return await collection.count_documents({"_id": {"$in": keys}}) == len(keys)

        await wait_for(handled, 30, f"the exporter to handle {message_ids}")


async def test_giving_up_fails_the_task_and_says_so(live_settings: Settings, tmp_path: Path) -> None:
    files = [FileRef(bucket=live_settings.object_store.bucket, key="jobs/job-9/outputs/x.dcm", size=1)]
    event = request("pacs", files, job_id="job-9")
    async with (
        completions(live_settings) as seen,
        open_services(live_settings, exporter.CONSUMER.indexes) as services,
    ):
        deps = exporter.build(services)
        await exporter.give_up(event, deps, "object store down for good")
        await exporter.give_up(event, deps, "a second give-up changes nothing")
        [completed] = await seen.wait(1)
        task = await deps.tasks.get("job-9.pacs")
    assert completed.status == "failed" and completed.message == "object store down for good"
    assert task.state is ExportState.failed and task.completion_published
    assert [r.error for r in task.file_results] == ["object store down for good"]


async def test_an_unknown_sink_fails_the_task_instead_of_dead_lettering(
    live_settings: Settings, tmp_path: Path
) -> None:
    files = await job_outputs(live_settings, tmp_path / "out")
    async with completions(live_settings) as seen, running_exporter(live_settings):
        await publish(live_settings, request("nowhere", files))
        [event] = await seen.wait(1)
    assert event.status == "failed" and "not found" in event.message


def pull_task(number: int) -> ExportRequested:
    files = [FileRef(bucket="mwm-test", key=f"jobs/job-{number}/outputs/a.dcm", size=1)]
    job_id = f"job-{number}"
    return ExportRequested(
        correlation_id=f"corr-{number}",
        export_task_id=f"{job_id}.ig",
        job_id=job_id,
        application_id="seg",
        sink=SinkRef(name="ig", type="external"),
        files=files,
    )


async def create_pull_tasks(tasks: ExportTasks, count: int) -> None:
    for number in range(count):
        assert await tasks.create(task_for(pull_task(number), utc_now()))
    assert not await tasks.create(task_for(pull_task(0), utc_now())), "a second create is refused"


async def test_two_claimers_never_hold_the_same_task(live_settings: Settings) -> None:
    async with Database(live_settings.mongo, exporter.CONSUMER.indexes) as database:
        await create_pull_tasks(ExportTasks(database), 12)

    async def claimer(owner: str) -> list[str]:
        async with Database(live_settings.mongo) as own_connection:
            tasks, held = ExportTasks(own_connection), []
            while (task := await tasks.claim("ig", owner, lease_s=60)) is not None:
                assert task.lease_owner == owner and task.state is ExportState.in_progress
                held.append(task.export_task_id)
            return held

    claimed = await asyncio.gather(*(claimer(f"client-{n}") for n in range(4)))
    everything = [task_id for held in claimed for task_id in held]
    assert len(everything) == len(set(everything)) == 12, claimed


async def test_an_expired_or_released_lease_returns_the_task(live_settings: Settings) -> None:
    async with Database(live_settings.mongo, exporter.CONSUMER.indexes) as database:
        tasks = ExportTasks(database)
        await create_pull_tasks(tasks, 1)
        first = await tasks.claim("ig", "dies", lease_s=0.5)
        assert first is not None and first.attempts == 1
        assert await tasks.claim("ig", "other", lease_s=60) is None, "held while the lease lives"

        async def expired() -> bool:
            return bool(await tasks.expire())

        await wait_for(expired, 5, "the lease to expire")
        assert (await tasks.get("job-0.ig")).state is ExportState.pending
        second = await tasks.claim("ig", "other", lease_s=60)
        assert second is not None and second.lease_owner == "other" and second.attempts == 2
        assert await tasks.claim("ig", "dies", lease_s=60) is None
        assert await tasks.release("job-0.ig", "other")
        assert (await tasks.get("job-0.ig")).state is ExportState.pending
        third = await tasks.claim("ig", "dies", lease_s=60)
        assert third is not None and third.lease_number == 3


async def test_the_final_result_is_recorded_once_and_tasks_are_queryable(live_settings: Settings) -> None:
    async with Database(live_settings.mongo, exporter.CONSUMER.indexes) as database:
        tasks = ExportTasks(database)
        await create_pull_tasks(tasks, 3)
        failed = [FileExportResult(key="jobs/job-1/outputs/a.dcm", status="failed", error="boom")]
        done = await tasks.record_result("job-1.ig", "failed", failed, "boom")
        again = await tasks.record_result("job-1.ig", "succeeded", [], "")
        assert done.state is again.state is ExportState.failed and again.file_results == failed
        assert await tasks.claim_task("job-1.ig", "late", lease_s=60) is None, "final: cannot be claimed"
        pending = await tasks.query(sink="ig", state=ExportState.pending, page=PageRequest(1, 1))
        assert pending.total == 2 and [t.export_task_id for t in pending.items] == ["job-0.ig"]
        assert (await tasks.query(sink="ig", state=ExportState.failed)).total == 1
