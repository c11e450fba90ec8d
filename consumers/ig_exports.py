"""IG exports: hand the export tasks of ``monai-ig`` sinks to a MONAI Informatics Gateway.

Queue ``<bus.queue_prefix>.ig-exports`` on MWM's bus, bound to ``mwm.export.requested.monai-ig``.

- In: ``ExportRequested`` for a ``monai-ig`` sink.
- Effect: the task (created from the event when missing) is taken in progress under a lease as long as
  the deadline; its files are placed in the IG's bucket (server-side copies, for files that live
  elsewhere) under de-duplicated keys (``wm.sinks.monai_ig``); the hand-off is recorded
  (``wm.stores.ig_exports``) and then one ``ExportRequestEvent`` is published to
  ``<ig.export_request_prefix>.<agent>`` on the IG's exchange, with the properties the IG requires.
- Emits: nothing on MWM's bus until the end: ``consumers.ig_completions`` records the IG's completion;
  the background sweep fails a task whose completion has not come by ``ig.export_deadline_s`` (the IG
  can drop one: an export request dead-lettered there, or a crash between its ack and its publish) and
  publishes ``ExportCompleted(failed)`` with that reason. Every ``ExportCompleted`` of an IG task is
  published by the one caller that claims it (``wm.stores.ig_exports.announce_once``); the sweep also
  publishes those whose claimer died before the broker confirmed them.
- Idempotency: a task id is published at most once (a unique insert before the publish); a redelivery
  finds the hand-off and is a duplicate. A final task only has its completion re-announced.
- Failure: an unknown sink or one without IG args fails the task at once. No IG queue bound for the
  agent (the IG is not running) or MWM's services down: retried, then ``give_up`` fails the task.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import structlog

from schemas.events import ExportRequested
from schemas.monai_ig import ExportRequestEvent
from wm.config import IgSettings, Settings
from wm.domain.exports import ExportTask, failed_result, final_result, task_for
from wm.domain.monai_ig import IgExport
from wm.errors import Duplicate, NotFound, PermanentError, TransientError
from wm.ig_queues import ig_enabled, ig_publisher
from wm.plugins import plugin_settings
from wm.ports import (
    BucketObjects,
    EventPublisher,
    ExportTaskRecords,
    IgExportRecords,
    IgTaskPublisher,
    SinkDirectory,
)
from wm.registry.sinks import Sinks
from wm.runtime import Consumer, Services
from wm.service_layer.periodic import every
from wm.sinks import registered_sink
from wm.sinks.monai_ig import MonaiIgSink
from wm.stores import exports, ig_exports
from wm.stores.exports import ExportTasks
from wm.stores.ig_exports import IgExports, announce_once, announce_stale, deadline_after

log = structlog.get_logger("consumers.ig_exports")

NAME = "ig-exports"
SINK_TYPE = "monai-ig"
OWNER = "monai-ig"


@dataclass(frozen=True)
class IgExportDeps:
    """The ports the IG export consumer uses."""

    tasks: ExportTaskRecords
    handoffs: IgExportRecords
    sinks: SinkDirectory
    objects: BucketObjects
    ig: IgTaskPublisher
    bus: EventPublisher
    settings: Settings

    @property
    def ig_settings(self) -> IgSettings:
        return self.settings.ig


async def handle(event: ExportRequested, deps: IgExportDeps) -> None:
    """Hand the task to the IG once; its completion (or the deadline) makes it final."""
    await deps.tasks.create(task_for(event, event.occurred_at))
    task = await deps.tasks.get(event.export_task_id)
    if task.is_final:
        await _announce(task, deps)
        return
    try:
        definition = await deps.sinks.get(task.sink.name)
        sink_type = registered_sink(definition.type, MonaiIgSink)
        sink = sink_type(definition, plugin_settings(sink_type, deps.settings))
    except (NotFound, PermanentError) as exc:
        final = await deps.tasks.record_result(
            task.export_task_id, "failed", failed_result(task.files, str(exc)).results, str(exc)
        )
        await _announce(final, deps)
        return
    hand_off = sink.hand_off(task)
    if hand_off.request is None:  # every file skipped by the sink's extensions
        outcome, results, message = final_result(task.files, hand_off.skipped)
        final = await deps.tasks.record_result(task.export_task_id, outcome, results, message)
        await _announce(final, deps)
        return
    deadline_s = deps.ig_settings.export_deadline_s
    await deps.tasks.claim_task(
        task.export_task_id, OWNER, deadline_s + 2 * deps.ig_settings.sweep_interval_s
    )
    ig_bucket = deps.objects.in_bucket(deps.ig_settings.bucket)
    await asyncio.gather(
        *(
            ig_bucket.copy(file.key, key, source_bucket=file.bucket)
            for key, file in hand_off.copies.items()
            if file.bucket != ig_bucket.bucket
        )
    )
    record = IgExport(
        export_task_id=task.export_task_id,
        job_id=task.job_id,
        routing_key=hand_off.routing_key,
        sent={key: file.key for key, file in hand_off.copies.items()},
        skipped=hand_off.skipped,
        deadline=deadline_after(deadline_s),
    )
    try:
        await deps.handoffs.begin(record)
    except Duplicate:
        raise Duplicate(f"export task {task.export_task_id} was handed to the IG already") from None
    await _publish(record, hand_off.request, task.correlation_id, deps)


async def _publish(
    record: IgExport, request: ExportRequestEvent, correlation_id: str, deps: IgExportDeps
) -> None:
    try:
        message_id = await deps.ig.publish(request, record.routing_key, correlation_id)
    except TransientError:
        await deps.handoffs.abandon(record.export_task_id)  # never taken: the retry hands it off again
        raise
    await deps.handoffs.published(record.export_task_id)
    log.info(
        "ig_export_requested",
        export_task_id=record.export_task_id,
        routing_key=record.routing_key,
        files=len(record.sent),
        ig_message_id=message_id,
    )


async def _announce(task: ExportTask, deps: IgExportDeps) -> bool:
    return await announce_once(deps.tasks, deps.handoffs, deps.bus, task)


async def give_up(event: ExportRequested, deps: IgExportDeps, reason: str) -> None:
    """Retries exhausted (the IG not listening, MWM's services down): the task fails with ``reason``."""
    task = await deps.tasks.get(event.export_task_id)
    final = await deps.tasks.record_result(
        task.export_task_id, "failed", failed_result(task.files, reason).results, reason
    )
    await _announce(final, deps)


async def fail_overdue(deps: IgExportDeps, now: datetime) -> int:
    """Fail every hand-off whose completion has not come by its deadline; returns how many."""
    overdue = await deps.handoffs.overdue(now)
    for record in overdue:
        task = await deps.tasks.get(record.export_task_id)
        sent = "published" if record.published_at else "never confirmed as published"
        reason = (
            f"no md.export.complete from the IG by the deadline {record.deadline.isoformat()} "
            f"(request to {record.routing_key} {sent})"
        )
        # The last result of a key wins: files the sink's extensions skipped stay skipped.
        outcome, results, _ = final_result(
            task.files, [*failed_result(task.files, reason).results, *record.skipped]
        )
        final = await deps.tasks.record_result(task.export_task_id, outcome, results, reason)
        await _announce(final, deps)
        await deps.handoffs.resolve(record.export_task_id)
        log.warning("ig_export_overdue", export_task_id=record.export_task_id, state=final.state)
    return len(overdue)


def announce_lease(settings: Settings) -> timedelta:
    """How long a claimed ``ExportCompleted`` may stay unconfirmed before its claimer counts as dead: its
    publish waits up to ``bus.publish_timeout_s``, each database write up to ``mongo.timeout_ms``."""
    return timedelta(seconds=3 * (settings.bus.publish_timeout_s + settings.mongo.timeout_ms / 1000))


async def sweep_overdue(deps: IgExportDeps, stop: asyncio.Event) -> None:
    """Background, every ``ig.sweep_interval_s``: fail overdue hand-offs, announce what dead claimers left."""

    async def sweep() -> None:
        await fail_overdue(deps, datetime.now(UTC))
        await announce_stale(deps.tasks, deps.handoffs, deps.bus, announce_lease(deps.settings))

    await every(deps.ig_settings.sweep_interval_s, stop, sweep, "ig_export_sweep", wait_first=True)


async def keep_ig_connection(deps: IgExportDeps, stop: asyncio.Event) -> None:
    """Background: the connection to the IG's broker that requests are published on."""
    await deps.ig.run(stop)


def build(services: Services) -> IgExportDeps:
    """Wire the ports to the process's shared connections."""
    return IgExportDeps(
        ExportTasks(services.database),
        IgExports(services.database),
        Sinks(services.database),
        services.objects,
        ig_publisher(services.settings),
        services.bus,
        services.settings,
    )


CONSUMER = Consumer[IgExportDeps](
    name=NAME,
    handlers={ExportRequested: handle},
    build_deps=build,
    routing_keys=(f"{ExportRequested.event_type}.{SINK_TYPE}",),
    indexes=(*exports.INDEXES, *ig_exports.INDEXES),
    on_give_up=give_up,
    background=(keep_ig_connection, sweep_overdue),
    enabled_when=ig_enabled,
)
