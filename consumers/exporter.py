"""Exporter: send an export task's files to its sink (DICOM C-STORE) and report what happened.

Queue ``mwm.exporter``, bound to ``mwm.export.requested.dicom``.

- In: ``ExportRequested``, self-contained (task id, job, sink by name and type, the files).
- Effect: the export task is created from the event when it is missing (the monitor normally inserted it),
  claimed under a short lease (``export.lease_s``, renewed every third of it while the sink runs: a killed
  exporter's task is re-requested by the sweep within the lease and ``SWEEP_INTERVAL_S``), its sink definition
  loaded by name from the registry and run (``wm.sinks``); the outcome (succeeded | partial | failed) and a
  result per file are recorded once.
- Emits: ``ExportCompleted`` with message id ``<task id>.completed``, after the final state is written;
  the task is then marked published (an outbox without transactions).
- Idempotency key: the export task id. A final task is never exported again: a redelivery publishes
  nothing, unless the completion was recorded but its publish never confirmed (a crash in between), and
  then it is re-published under the same message id. A task another exporter holds under a live lease is
  acknowledged as a duplicate; if that holder dies, the background sweep re-requests the task once its
  lease expires.
- Failure: destination problems are per-file results, never requeues: the sink retries transient ones
  itself (bounded), a rejected association fails at once. An unknown sink (or sink type) fails the task.
  MWM's own services down: ``TransientError``, retried by the runtime, then ``give_up`` marks the task
  failed and publishes ``ExportCompleted(failed)``, so nothing waits forever.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import socket
import uuid
from dataclasses import dataclass

import structlog

from schemas.applications import SinkDefinition
from schemas.events import ExportRequested
from wm import exports
from wm.domain.exports import ExportResult, ExportTask, failed_result, requested_event, task_for
from wm.errors import Duplicate, NotFound, PermanentError
from wm.exports import ExportTasks, announce_completion
from wm.leases import renewed
from wm.ports import EventPublisher, ExportTaskRecords, Sink, SinkDirectory, SinkOpener
from wm.registry.sinks import Sinks
from wm.runtime import Consumer, Services
from wm.sinks import load_sink

log = structlog.get_logger("consumers.exporter")

NAME = "exporter"
SINK_TYPES = ("dicom",)
ROUTING_KEYS = tuple(f"{ExportRequested.event_type}.{sink_type}" for sink_type in SINK_TYPES)
PREFETCH = 4
SWEEP_INTERVAL_S = 10.0


@dataclass(frozen=True)
class ExporterDeps:
    """The ports the exporter uses."""

    tasks: ExportTaskRecords
    sinks: SinkDirectory
    open_sink: SinkOpener
    bus: EventPublisher
    process: str
    lease_s: float


async def handle(event: ExportRequested, deps: ExporterDeps) -> None:
    """Run the task's sink once, record the per-file results, publish ``export.completed``."""
    task = await _task(event, deps)
    if task.is_final:
        await _announce(task, deps)
        return
    owner = f"{deps.process}:{uuid.uuid4().hex[:8]}"
    if await deps.tasks.claim_task(task.export_task_id, owner, deps.lease_s) is None:
        raise Duplicate(f"export task {task.export_task_id} is final or held by another exporter")
    try:
        renew = functools.partial(deps.tasks.claim_task, task.export_task_id, owner, deps.lease_s)
        async with renewed(renew, deps.lease_s, f"export task {task.export_task_id}"):
            outcome, results, message = await _run_sink(task, deps)
        final = await deps.tasks.record_result(task.export_task_id, outcome, results, message)
    except BaseException:
        with contextlib.suppress(Exception):
            await deps.tasks.release(task.export_task_id, owner)
        raise
    log.info(
        "export_finished",
        outcome=final.state,
        sink=task.sink.name,
        files=len(task.files),
        detail=final.message,
    )
    await _announce(final, deps)


async def give_up(event: ExportRequested, deps: ExporterDeps, reason: str) -> None:
    """Retries exhausted: the task fails with ``reason`` (unless it is final already) and says so."""
    task = await _task(event, deps)
    final = await deps.tasks.record_result(task.export_task_id, *failed_result(task.files, reason))
    await _announce(final, deps)


async def _task(event: ExportRequested, deps: ExporterDeps) -> ExportTask:
    await deps.tasks.create(task_for(event, event.occurred_at))
    return await deps.tasks.get(event.export_task_id)


async def _run_sink(task: ExportTask, deps: ExporterDeps) -> ExportResult:
    try:
        sink = deps.open_sink(await deps.sinks.get(task.sink.name))
    except (NotFound, PermanentError) as exc:
        return failed_result(task.files, str(exc))
    return await sink.export(task.files)


async def _announce(task: ExportTask, deps: ExporterDeps) -> None:
    await announce_completion(deps.tasks, deps.bus, task)


async def sweep_expired_leases(deps: ExporterDeps, stop: asyncio.Event) -> None:
    """Background: give expired leases' tasks back, and re-request the ones this consumer exports."""
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), SWEEP_INTERVAL_S)
        if stop.is_set():
            return
        try:
            for task in await deps.tasks.expire():
                if task.sink.type in SINK_TYPES:
                    message_id = f"{task.export_task_id}.requested.lease{task.lease_number}"
                    await deps.bus.publish(requested_event(task), message_id=message_id)
                    log.warning("export_lease_expired", export_task_id=task.export_task_id)
        except Exception as exc:  # a sweep that fails is tried again at the next interval
            log.warning("export_sweep_failed", error=repr(exc))


def build(services: Services) -> ExporterDeps:
    """Wire the ports to the process's shared connections."""
    settings = services.settings

    def open_sink(definition: SinkDefinition) -> Sink:
        return load_sink(definition, settings, services.objects)

    process = f"{NAME}@{socket.gethostname()}:{os.getpid()}"
    return ExporterDeps(
        ExportTasks(services.database),
        Sinks(services.database),
        open_sink,
        services.bus,
        process,
        settings.export.lease_s,
    )


CONSUMER = Consumer[ExporterDeps](
    name=NAME,
    routing_keys=ROUTING_KEYS,
    handlers={ExportRequested: handle},
    build_deps=build,
    indexes=exports.INDEXES,
    on_give_up=give_up,
    background=(sweep_expired_leases,),
    prefetch=PREFETCH,
)
