"""Job retry (issue #18): a job failed by an engine outage runs again on its staged inputs, exported once.

The engine is the real Argo stack (``scripts/argo-stack``); its Argo Server is stopped for the outage.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

from consumers import discovery, monitor, scheduler
from devkit.argo_stack import (
    ArgoStack,
    Executor,
    Produce,
    argo_application,
    argo_stack,
    forget_workflows,
    stack_command,
)
from devkit.dicom import write_ct_study
from devkit.peers import LOCALHOST, free_port
from devkit.pipeline import arrive, consumers_running, register, tap
from devkit.services import settings_env
from schemas.applications import SinkDefinition
from schemas.events import ExportRequested, JobFinished, JobLaunched
from tests.support.api import api_settings
from tests.support.cli import Cli
from wm.adapters.mongo import Database
from wm.adapters.objectstore import ObjectStore
from wm.adapters.rabbitmq import Bus
from wm.api.app import create_app
from wm.api.server import running
from wm.config import Settings
from wm.registry import Registry
from wm.stores.exports import EXPORT_TASKS

AE_TITLE = "MWM-SEG"


def quick_to_give_up(settings: Settings, stack: ArgoStack) -> Settings:
    """The Argo stack as engine; an outage outlasts the scheduler's (short) retry budget."""
    settings = stack.settings(api_settings(settings, free_port()), retries=0, request_timeout_s=1.0)
    retry = settings.retry.model_copy(update={"attempts": 2, "initial_delay_s": 0.1, "max_delay_s": 0.1})
    monitor_settings = settings.monitor.model_copy(update={"poll_interval_s": 0.5})
    return settings.model_copy(update={"retry": retry, "monitor": monitor_settings})


async def add_sink(settings: Settings) -> None:
    sink = {"name": "pacs", "type": "dicom", "args": {"ae_title": "PACS", "host": "127.0.0.1", "port": 11199}}
    async with Database(settings.mongo) as database:
        await Registry(database).sinks.create(SinkDefinition.model_validate(sink))


def segmentation(result: Path) -> Produce:
    """The step's work as the MAP would do it: one result file."""

    async def produce(input_key: str, output_key: str, objects: ObjectStore) -> None:
        await objects.put_file(f"{output_key}/seg.dcm", result)

    return produce


async def test_a_job_failed_by_an_engine_outage_is_retried_and_its_result_exported_once(
    live_settings: Settings, tmp_path: Path
) -> None:
    stack = argo_stack()
    app = f"seg-{uuid.uuid4().hex[:8]}"
    settings = quick_to_give_up(live_settings, stack)
    cli = Cli(settings_env(settings))
    await forget_workflows(stack, app)
    await add_sink(settings)
    await register(settings, argo_application(app, AE_TITLE, sinks=["pacs"]))
    study = write_ct_study(tmp_path / "s", series=1, slices_per_series=3, seed=18)
    keys = (JobLaunched.event_type, JobFinished.event_type, "mwm.export.requested.#")
    async with Bus(settings.bus) as bus:
        await bus.declare_consumer_queue(bus.channel, "exporter", ("mwm.export.requested.dicom",))
    result = tmp_path / "seg.dcm"
    result.write_bytes(b"result")
    executor = Executor(stack, settings, selector=f"mwm.application={app}", produce=segmentation(result))
    async with (
        running(create_app(settings), LOCALHOST, settings.api.port),
        tap(settings, *keys) as events,
        consumers_running(settings, [discovery.CONSUMER, scheduler.CONSUMER, monitor.CONSUMER]),
        executor.running(),
    ):
        stack_command("stop", "server")  # the engine is out for longer than the scheduler retries
        try:
            await arrive(settings, study.files, called_ae=AE_TITLE)
            [failed] = await events.wait_for(JobFinished, 1, 60)
        finally:
            stack_command("start", "server")
        argo_stack()  # the server answers again
        replay = json.loads((await cli("dlq", "replay", "scheduler", "-o", "json")).out)
        retried = await cli("jobs", "retry", failed.job_id)
        shown = json.loads((await cli("jobs", "show", failed.job_id, "-o", "json")).out)
        [launched] = await events.wait_for(JobLaunched, 1, 30)
        async with ObjectStore(settings.object_store) as objects:
            staged = await objects.list(launched.input_prefix)
        [_, succeeded] = await events.wait_for(JobFinished, 2, 120)
        [requested] = await events.wait_for(ExportRequested, 1, 10)
        again = await cli("jobs", "retry", failed.job_id)
    async with Database(settings.mongo) as database:
        tasks = await database.collection(EXPORT_TASKS).count_documents({"job_id": failed.job_id})
    assert failed.status == "failed" and "transient failure persisted" in failed.message, failed.message
    [letter] = replay
    assert letter["replayed"] is False and f"job {failed.job_id} already ended (failed)" in letter["note"]
    assert f"mwm jobs retry {failed.job_id}" in letter["note"]
    assert retried.code == 0 and "attempt 2 is launched" in retried.out, retried.err
    assert shown["attempt"] == 2 and [a["state"] for a in shown["attempts"]] == ["failed"]
    assert launched.job_id == failed.job_id and launched.engine_job_id.endswith(f"{failed.job_id}-a2")
    assert len(staged) == len(study.files), "the retry runs on the inputs staged for the first attempt"
    assert succeeded.job_id == failed.job_id and succeeded.status == "succeeded"
    [output] = succeeded.outputs
    assert output.key.startswith(launched.output_prefix) and output.key.endswith("/seg.dcm"), output.key
    assert len(events.of(ExportRequested)) == 1 and requested.job_id == failed.job_id
    assert tasks == 1, "the result is exported once"
    assert again.code == 1 and "(409)" in again.err and "succeeded" in again.err
