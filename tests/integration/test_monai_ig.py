"""MWM behind a MONAI Informatics Gateway (the emulator) on the real broker, S3 and dcmtk storescp."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path

import aio_pika
import pydicom
import pytest

from consumers import discovery
from devkit.dicom import write_ct_study
from devkit.ig_emulator import (
    APP_ID,
    VERSIONS,
    Destination,
    IgEmulator,
    Version,
    export_complete_body,
    newtonsoft,
    properties,
)
from devkit.ig_loop import IG_CONSUMERS, LOOP_CONSUMERS, add_ig_sink, ig_stack, request_export
from devkit.peers import LOCALHOST, astorescu, free_port
from devkit.peers.dcmtk import StoreSCP
from devkit.pipeline import consumers_running, mip_application, register, tap
from devkit.services import queue_settled, wait_for
from producers.gateway import serving
from schemas.events import ExportCompleted, JobLaunched, SinkRef
from wm.adapters.mongo import Database
from wm.adapters.objectstore import ObjectStore
from wm.adapters.rabbitmq import REASON_HEADER, dead_letter_queue_name
from wm.config import Settings
from wm.domain.exports import ExportState
from wm.stores.exports import ExportTasks

pytestmark = pytest.mark.integration


async def export_state(settings: Settings, task_id: str) -> ExportState:
    async with Database(settings.mongo) as database:
        return (await ExportTasks(database).get(task_id)).state


async def dead_letters(
    settings: Settings, url: str, consumer: str
) -> list[aio_pika.abc.AbstractIncomingMessage]:
    """Every message in MWM's dead-letter queue of ``consumer`` on the IG's vhost."""
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(dead_letter_queue_name(settings.bus, consumer), passive=True)
        messages = []
        while (message := await queue.get(fail=False, no_ack=True)) is not None:
            messages.append(message)
        return messages


def assert_published_as_the_ig_does(message: aio_pika.abc.AbstractIncomingMessage, message_type: str) -> None:
    """The properties Monai.Deploy.Messaging sets on every publish (``JsonMessage``)."""
    assert message.content_type == "application/json" and message.delivery_mode == 2
    assert message.type == message_type and message.app_id == APP_ID
    assert message.correlation_id == json.loads(message.body)["correlation_id"]
    assert uuid.UUID(str(message.message_id)) and message.timestamp is not None


def uploaded_keys(emulator: IgEmulator, payload_id: str) -> set[str]:
    listing = emulator.s3.list_objects(emulator.bucket, prefix=f"{payload_id}/", recursive=True)
    return {str(item.object_name) for item in listing}


def ig_object_keys(payload_id: str, files: list[Path]) -> set[str]:
    """Where the IG stores each file and its DICOM JSON: ``{payload_id}/dcm/{study}/{series}/{sop}.dcm``."""
    keys: set[str] = set()
    for path in files:
        header = pydicom.dcmread(path, stop_before_pixels=True)
        uids = (header.StudyInstanceUID, header.SeriesInstanceUID, header.SOPInstanceUID)
        key = f"{payload_id}/dcm/{'/'.join(map(str, uids))}.dcm"
        keys |= {key, f"{key}.json"}
    return keys


@pytest.mark.parametrize("version", VERSIONS)
async def test_the_full_loop_through_the_ig(
    live_settings: Settings, tmp_path: Path, version: Version
) -> None:
    study = write_ct_study(tmp_path / "study", series=2, slices_per_series=3, seed=15)
    async with StoreSCP(tmp_path / "pacs", aet="STORESCP") as scp:
        pacs = {"PACS": Destination("STORESCP", scp.host, scp.port)}
        async with ig_stack(live_settings, version, pacs) as (settings, emulator):
            await add_ig_sink(settings, "ig-pacs", ["PACS"])
            await register(
                settings, mip_application(ae_title="MONAI-MIP", quiet_period_s=30, sinks=["ig-pacs"])
            )
            # A Workflow Manager on the same vhost: its md.workflow.request queue keeps getting its copy.
            channel = await emulator._connection.channel()  # type: ignore[union-attr]
            wm_queue = await emulator.declare_queue(channel, "md.workflow.request")
            workflows = ["mip"] if version == "0.4" else ["3f1c5a0e-8f2d-4b44-bb0f-9a7e2c1d0e55"]
            async with (
                tap(settings, JobLaunched.event_type, ExportCompleted.event_type) as events,
                consumers_running(settings, LOOP_CONSUMERS),
            ):
                payload_id = await emulator.send_study(
                    study.files, called_ae="MONAI-MIP", workflows=workflows
                )
                [completed] = await events.wait_for(ExportCompleted, 1, 120)
                received = await scp.await_files(2, timeout=10)
            wm_copy = await wm_queue.get(fail=False, no_ack=True)
            assert wm_copy is not None, "the WM's queue got the request too"
            assert_published_as_the_ig_does(wm_copy, "WorkflowRequestEvent")
            assert json.loads(wm_copy.body)["payload_id"] == payload_id
            uploaded = await asyncio.to_thread(uploaded_keys, emulator, payload_id)
            assert uploaded == ig_object_keys(payload_id, study.files), "{payload_id}/dcm/... and .dcm.json"
    [launched] = events.of(JobLaunched)
    assert completed.status == "succeeded", completed.message
    assert completed.job_id == launched.job_id and completed.sink == SinkRef(name="ig-pacs", type="monai-ig")
    assert len(completed.file_results) == 2 and {r.status for r in completed.file_results} == {"succeeded"}
    assert len(received) == 2, "one MIP per series, C-STOREd by the IG"
    [record] = emulator.exports
    request = record.request
    assert request["workflow_instance_id"] == launched.job_id
    assert len(request["files"]) == len(set(request["files"])) == 2
    assert all(key.startswith(f"mwm-exports/{completed.export_task_id}/") for key in request["files"])
    assert await export_state(settings, completed.export_task_id) is ExportState.succeeded
    async with ObjectStore(settings.object_store) as objects:
        staged = await objects.list(launched.input_prefix)
    assert len(staged) == len(study.files), "staging copied the IG's files across buckets to the job"


async def test_an_export_request_carries_the_properties_the_ig_requires(
    live_settings: Settings, tmp_path: Path
) -> None:
    async with ig_stack(live_settings, "0.4") as (settings, emulator):
        await add_ig_sink(settings, "ig-pacs", ["PACS"])
        await emulator.__aexit__()  # stop serving: read the request as it lands
        connection = await aio_pika.connect(emulator.url)
        async with connection, consumers_running(settings, IG_CONSUMERS):
            channel = await connection.channel()
            queue = await channel.declare_queue("md.export.request.monaiscu", passive=True)
            task_id = await request_export(settings, tmp_path)
            message = await _get(queue)
        assert message.content_type == "application/json" and message.delivery_mode == 2
        assert message.type == "ExportRequestEvent" and message.app_id == settings.ig.app_id
        assert message.correlation_id == "corr-job-1" and uuid.UUID(str(message.message_id))
        assert message.timestamp is not None
        body = json.loads(message.body)
        assert body["export_task_id"] == task_id and body["destinations"] == ["PACS"]


async def _get(queue: aio_pika.abc.AbstractQueue) -> aio_pika.abc.AbstractIncomingMessage:
    found: list[aio_pika.abc.AbstractIncomingMessage] = []

    async def arrived() -> bool:
        message = await queue.get(fail=False, no_ack=True)
        if message is not None:
            found.append(message)
        return bool(found)

    await wait_for(arrived, 60, "an export request on md.export.request.monaiscu")
    return found[0]


async def test_a_completion_that_never_comes_fails_the_task_at_its_deadline(
    live_settings: Settings, tmp_path: Path
) -> None:
    async with ig_stack(live_settings, "0.4", export_deadline_s=2.0) as (settings, emulator):
        emulator.drop_completions = True
        await add_ig_sink(settings, "ig-pacs", ["PACS"])
        async with (
            tap(settings, ExportCompleted.event_type) as events,
            consumers_running(settings, IG_CONSUMERS),
        ):
            task_id = await request_export(settings, tmp_path)
            [completed] = await events.wait_for(ExportCompleted, 1, 60)
    assert len(emulator.exports) == 1, "the IG took the request and dropped its completion"
    assert (
        completed.status == "failed"
        and "no md.export.complete from the IG by the deadline" in completed.message
    )
    assert all(r.status == "failed" and "deadline" in (r.error or "") for r in completed.file_results)
    assert await export_state(settings, task_id) is ExportState.failed


async def test_partial_failure_is_recorded_per_file_and_a_duplicate_completion_changes_nothing(
    live_settings: Settings, tmp_path: Path
) -> None:
    async with StoreSCP(tmp_path / "pacs", aet="STORESCP") as scp:
        pacs = {"PACS": Destination("STORESCP", scp.host, scp.port)}
        async with ig_stack(live_settings, "0.5", pacs) as (settings, emulator):
            emulator.duplicate_completions = True
            await add_ig_sink(settings, "ig-pacs", ["PACS"])
            async with (
                tap(settings, ExportCompleted.event_type) as events,
                consumers_running(settings, IG_CONSUMERS),
            ):
                task_id = await request_export(settings, tmp_path, extra=b"not DICOM at all")
                await events.wait_for(ExportCompleted, 1, 60)
                await _handled(settings, "ig-completions", 2)
                await queue_settled(events.queue)
            # The second completion changes nothing: the first result stays, announced once.
            [completed] = events.of(ExportCompleted)
            assert events.message_ids[events.events.index(completed)] == f"{task_id}.completed"
    assert completed.status == "partial"
    statuses = {r.key.rsplit("/", 1)[-1]: (r.status, r.error or "") for r in completed.file_results}
    assert statuses["0.dcm"][0] == statuses["1.dcm"][0] == "succeeded"
    assert statuses["broken.dcm"][0] == "failed" and "UnsupportedDataType" in statuses["broken.dcm"][1]
    assert await export_state(settings, task_id) is ExportState.partial


async def _handled(settings: Settings, consumer: str, count: int) -> None:
    """Wait until ``consumer`` recorded ``count`` handled messages (the runtime's processed keys)."""
    async with Database(settings.mongo) as database:
        collection = database.collection("processed_messages")

        async def enough() -> bool:
            return await collection.count_documents({"_id": {"$regex": f"^{consumer}:"}}) >= count

        await wait_for(enough, 30, f"{count} messages handled by {consumer}")


async def test_two_duplicate_completions_handled_at_once_announce_the_task_once(
    live_settings: Settings, tmp_path: Path
) -> None:
    async with ig_stack(live_settings, "0.5") as (settings, emulator):
        emulator.drop_completions = True  # the IG takes the request; its completions are sent below
        await add_ig_sink(settings, "ig-pacs", ["PACS"])
        async with (
            tap(settings, ExportCompleted.event_type) as events,
            consumers_running(settings, IG_CONSUMERS),
        ):
            task_id = await request_export(settings, tmp_path)

            async def requested() -> bool:
                return bool(emulator.exports)

            await wait_for(requested, 60, "the export request at the IG")
            request = emulator.exports[0].request
            body = newtonsoft(
                export_complete_body("0.5", request, "Success", "", dict.fromkeys(request["files"], 0))
            )
            # As IG 0.5 re-sends after a crash between its publish and its ack: same body, new message id;
            # both in flight at once, so the two deliveries are handled concurrently.
            sends = [properties("ExportCompleteEvent", "corr-job-1") for _ in range(2)]
            await asyncio.gather(*(emulator.publish(body, "md.export.complete", **p) for p in sends))
            await _handled(settings, "ig-completions", 2)
            await queue_settled(events.queue)
    [(completed, message_id)] = [
        (e, events.message_ids[i]) for i, e in enumerate(events.events) if isinstance(e, ExportCompleted)
    ]
    assert message_id == f"{task_id}.completed" and completed.status == "succeeded"
    assert await export_state(settings, task_id) is ExportState.succeeded


async def test_a_completion_for_a_task_mwm_does_not_know_is_acknowledged_and_ignored(
    live_settings: Settings,
) -> None:
    async with ig_stack(live_settings, "0.4") as (settings, emulator):
        async with consumers_running(settings, IG_CONSUMERS):
            body = {
                "workflow_instance_id": "wm-1",
                "export_task_id": "wm-export",
                "status": "Success",
                "message": "",
                "file_statuses": {},
            }
            await emulator.publish(
                json.dumps(body).encode(), "md.export.complete", **properties("ExportCompleteEvent", "c")
            )
            await _handled(settings, "ig-completions", 1)
        assert await dead_letters(settings, emulator.url, "ig-completions") == []


async def test_a_malformed_completion_is_dead_lettered_with_its_reason(live_settings: Settings) -> None:
    async with (
        ig_stack(live_settings, "0.4") as (settings, emulator),
        consumers_running(settings, IG_CONSUMERS),
    ):
        body = b'{"workflow_instance_id": "job-1", "export_task_id": "job-1.ig-pacs", "status": "Done"}'
        await emulator.publish(body, "md.export.complete", **properties("ExportCompleteEvent", "c"))
        await _dead_lettered(settings, emulator, "ig-completions")
        [dead] = await dead_letters(settings, emulator.url, "ig-completions")
    reason = str((dead.headers or {})[REASON_HEADER])
    assert "ExportCompleteEvent failed validation" in reason and "'Done' is not one of" in reason


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"correlation_id": None}, "missing AMQP property correlation_id"),
        ({"app_id": ""}, "missing AMQP property app_id"),
        ({"body": b'{"payload_id": "p"'}, "WorkflowRequestEvent failed validation"),
        ({"body": b'{"payload_id": "p", "file_count": 1}'}, "payload: Field required"),
    ],
)
async def test_a_malformed_workflow_request_is_dead_lettered_with_its_reason(
    live_settings: Settings, change: dict[str, object], reason: str
) -> None:
    async with ig_stack(live_settings, "0.4") as (settings, emulator):
        async with consumers_running(settings, IG_CONSUMERS):
            props = properties("WorkflowRequestEvent", "corr") | change
            body = props.pop("body", b"{}")
            assert isinstance(body, bytes)
            await emulator.publish(body, "md.workflow.request", **props)
            await _dead_lettered(settings, emulator, "ig-requests")
        [dead] = await dead_letters(settings, emulator.url, "ig-requests")
    assert reason in str((dead.headers or {})[REASON_HEADER])


async def _dead_lettered(settings: Settings, emulator: IgEmulator, consumer: str) -> None:
    """Wait until a message is in ``consumer``'s dead-letter queue on the IG's vhost."""
    connection = await aio_pika.connect(emulator.url)
    async with connection:
        channel = await connection.channel()

        async def dead_lettered() -> bool:
            queue = await channel.declare_queue(dead_letter_queue_name(settings.bus, consumer), passive=True)
            return bool(queue.declaration_result.message_count)

        await wait_for(dead_lettered, 30, "the dead letter")


async def test_the_ig_and_mwms_own_gateway_ingest_side_by_side(
    live_settings: Settings, tmp_path: Path
) -> None:
    via_ig = write_ct_study(tmp_path / "ig", series=1, slices_per_series=3, seed=21, patient_id="VIA-IG")
    via_gateway = write_ct_study(tmp_path / "gw", series=1, slices_per_series=3, seed=22, patient_id="VIA-GW")
    async with StoreSCP(tmp_path / "pacs", aet="STORESCP") as scp:
        pacs = {"PACS": Destination("STORESCP", scp.host, scp.port)}
        async with ig_stack(live_settings, "0.4", pacs) as (ig_settings, emulator):
            gateway = ig_settings.gateway.model_copy(update={"host": LOCALHOST, "port": free_port()})
            settings = ig_settings.model_copy(update={"gateway": gateway})
            await add_ig_sink(settings, "ig-pacs", ["PACS"])
            application = mip_application(ae_title="MWM-MIP", quiet_period_s=1.0, sinks=["ig-pacs"])
            application["ae_titles"] = ["MWM-MIP", "MONAI-MIP"]
            await register(settings, application)
            async with (
                tap(settings, JobLaunched.event_type, ExportCompleted.event_type) as events,
                consumers_running(settings, [*LOOP_CONSUMERS, discovery.CONSUMER]),
                serving(settings) as (server, _),
            ):
                await emulator.send_study(via_ig.files, called_ae="MONAI-MIP")
                host, port = server.address
                result = await astorescu(host, port, "MWM-MIP", via_gateway.files, calling_aet="CT-SCANNER")
                assert result.returncode == 0, result.stderr
                completed = await events.wait_for(ExportCompleted, 2, 120)
                received = await scp.await_files(2, timeout=10)
    launched = events.of(JobLaunched)
    assert len(launched) == 2 and {e.status for e in completed} == {"succeeded"}
    assert {e.bucket_id.startswith("ig.") for e in launched} == {True, False}, "one job per ingest path"
    patients = {str(pydicom.dcmread(path).PatientID) for path in received}
    assert patients == {"VIA-IG", "VIA-GW"}
