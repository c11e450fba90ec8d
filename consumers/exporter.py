"""Exporter: send an export task's files to its sink (DICOM C-STORE) and report what happened.

Queue ``mwm.exporter``, bound to ``mwm.export.requested.dicom``.

- In: ``ExportRequested``, self-contained (task id, job, sink by name and type, the files).
- Effect: the export task is created from the event when it is missing (the monitor normally inserted it),
  claimed under a short lease (``export.lease_s``, renewed every third of it while the sink runs: a killed
  exporter's task is re-requested by the sweep within the lease and ``export.sweep_interval_s``), its sink
  definition loaded by name from the registry and run (``wm.sinks``); the outcome (succeeded | partial |
  failed) and a result per file are recorded once.
- Emits: ``ExportCompleted`` with message id ``<task id>.completed``, after the final state is written;
  the task is then marked published (an outbox without transactions).
- Idempotency key: the export task id. A final task is never exported again: a redelivery publishes
  nothing, unless the completion was recorded but its publish never confirmed (a crash in between), and
  then it is re-published under the same message id. A task another exporter holds under a live lease is
  acknowledged as a duplicate; if that holder dies, the background sweep re-requests the task once its
  lease expires. So it does when the holder was this very delivery's earlier attempt, which took the lease
  and lost the database before the task showed it (`wm.stores.export_leases.ExportLeases.abandon`).
- Failure: destination problems are per-file results, never requeues. A destination unavailable through the
  sink's short retries defers the task: its lease is given back, the delivery acknowledged, and a timer
  requests it again after a backoff with jitter, over ``export.redelivery_window_s``; only the files not sent
  yet go again (``wm.stores.export_retry``). A rejected association fails at once. An unknown sink (or sink
  type)
  fails the task. MWM's own services down: ``TransientError``, retried by the runtime, then ``give_up`` marks
  the task failed and publishes ``ExportCompleted(failed)``, so nothing waits forever.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import socket
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

import structlog

from schemas.applications import SinkDefinition
from schemas.events import ExportRequested
from wm.domain.exports import (
    ExportResult,
    ExportTask,
    RedeliveryPolicy,
    failed_result,
    final_result,
    kept_results,
    requested_event,
    task_for,
    unsent,
)
from wm.errors import Duplicate, NotFound, PermanentError
from wm.leases import renewed
from wm.ports import (
    EventPublisher,
    ExportRedeliveries,
    ExportTaskRecords,
    Sink,
    SinkDirectory,
    SinkOpener,
)
from wm.registry.sinks import Sinks
from wm.runtime import Consumer, Services
from wm.service_layer.periodic import every
from wm.sinks import DestinationUnavailable, load_sink
from wm.stores import export_retry, exports
from wm.stores.export_retry import ExportRetries
from wm.stores.exports import ExportTasks, announce_completion

log = structlog.get_logger("consumers.exporter")

NAME = "exporter"
SINK_TYPES = ("dicom",)
ROUTING_KEYS = tuple(f"{ExportRequested.event_type}.{sink_type}" for sink_type in SINK_TYPES)
PREFETCH = 4


@dataclass(frozen=True)
class ExporterDeps:
    """The ports the exporter uses."""

    tasks: ExportTaskRecords
    sinks: SinkDirectory
    open_sink: SinkOpener
    bus: EventPublisher
    process: str
    lease_s: float
    retries: ExportRedeliveries
    redelivery: RedeliveryPolicy
    sweep_interval_s: float
    redelivery_sweep_s: float


async def handle(event: ExportRequested, deps: ExporterDeps) -> None:
    """Run the task's sink once, record the per-file results, publish ``export.completed``."""
    task = await _task(event, deps)
    if task.is_final:
        await _announce(task, deps)
        return
    owner = f"{deps.process}:{uuid.uuid4().hex[:8]}"
    held = await deps.tasks.claim_task(task.export_task_id, owner, deps.lease_s)
    if held is None:
        raise Duplicate(f"export task {task.export_task_id} is final or held by another exporter")
    try:
        final = await _export(held, owner, deps)
    except BaseException:
        with contextlib.suppress(Exception):
            await deps.tasks.release(task.export_task_id, owner)
        raise
    if final is None:
        return  # deferred: a timer requests it again (`wm.stores.export_retry`)
    log.info(
        "export_finished",
        outcome=final.state,
        sink=task.sink.name,
        files=len(task.files),
        detail=final.message,
    )
    await _announce(final, deps)


async def _export(task: ExportTask, owner: str, deps: ExporterDeps) -> ExportTask | None:
    """Send the task's files not sent yet; the final task, or None when deferred to a redelivery."""
    renew = functools.partial(deps.tasks.claim_task, task.export_task_id, owner, deps.lease_s)
    try:
        async with renewed(renew, deps.lease_s, f"export task {task.export_task_id}"):
            outcome, results, message = await _run_sink(task, deps)
    except DestinationUnavailable as exc:
        deferred = await deps.retries.defer(task, owner, exc.results, exc.reason, deps.redelivery)
        if deferred is not None:
            log.warning("export_deferred", export_task_id=task.export_task_id, retry_at=deferred.retry_at)
            return None
        reason = f"{exc.reason}; still unavailable after the redelivery window"
        sent = [*kept_results(task.file_results), *kept_results(exc.results)]
        outcome, results, message = final_result(
            task.files, [*failed_result(unsent(task.files, sent), reason).results, *sent]
        )
    return await deps.tasks.record_result(task.export_task_id, outcome, results, message)


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
    sent = kept_results(task.file_results)  # by an earlier attempt, before a redelivery or a retry
    fresh = await sink.export(unsent(task.files, sent))
    return final_result(task.files, [*sent, *fresh.results])


async def _announce(task: ExportTask, deps: ExporterDeps) -> None:
    await announce_completion(deps.tasks, deps.bus, task)


async def sweep_expired_leases(deps: ExporterDeps, stop: asyncio.Event) -> None:
    """Background: give expired leases' tasks back, and re-request the ones this consumer exports."""
    watching = False

    async def sweep() -> None:
        nonlocal watching
        if not watching:  # once per start (tried again while the database is out): see export_index
            if repaired := await deps.tasks.watch_open():
                log.warning("unwatched_export_tasks_watched", tasks=repaired)
            watching = True
        await _requeue_expired(deps)

    await every(deps.sweep_interval_s, stop, sweep, "export_sweep", wait_first=True)


async def _requeue_expired(deps: ExporterDeps) -> None:
    for task in await deps.tasks.expire():
        if task.sink.type in SINK_TYPES:
            message_id = f"{task.export_task_id}.requested.lease{task.lease_number}"
            await deps.bus.publish(requested_event(task), message_id=message_id)
            log.warning("export_lease_expired", export_task_id=task.export_task_id)


async def redeliver_due(deps: ExporterDeps, stop: asyncio.Event) -> None:
    """Background: request again the deferred tasks whose redelivery is due (`wm.stores.export_retry`)."""
    redeliver = functools.partial(_redeliver, deps)
    await every(deps.redelivery_sweep_s, stop, redeliver, "export_redelivery", wait_first=True)


async def _redeliver(deps: ExporterDeps) -> None:
    for task_id, due_at in await deps.retries.due(datetime.now(UTC)):
        if await deps.retries.redeliver(task_id, due_at, deps.bus):
            log.info("export_redelivered", export_task_id=task_id)


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
        ExportRetries(services.database),
        RedeliveryPolicy(
            settings.export.redelivery_window_s,
            settings.export.redelivery_initial_delay_s,
            settings.export.redelivery_max_delay_s,
        ),
        settings.export.sweep_interval_s,
        settings.export.redelivery_sweep_s,
    )


CONSUMER = Consumer[ExporterDeps](
    name=NAME,
    routing_keys=ROUTING_KEYS,
    handlers={ExportRequested: handle},
    build_deps=build,
    indexes=(*exports.INDEXES, *export_retry.INDEXES),
    on_give_up=give_up,
    background=(sweep_expired_leases, redeliver_due),
    prefetch=PREFETCH,
)
