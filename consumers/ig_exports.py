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
  publishes ``ExportCompleted(failed)`` with that reason.
- Idempotency: a task id is published at most once (a unique insert before the publish); a redelivery
  finds the hand-off and is a duplicate. A final task only has its completion re-announced.
- Failure: an unknown sink or one without IG args fails the task at once. No IG queue bound for the
  agent (the IG is not running) or MWM's services down: retried, then ``give_up`` fails the task.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from datetime import UTC, datetime

import structlog

from schemas.events import ExportRequested
from schemas.monai_ig import ExportRequestEvent
from wm.config import IgSettings, Settings
from wm.domain.exports import failed_result, final_result, task_for
from wm.errors import Duplicate, NotFound, PermanentError, TransientError
from wm.ig_queues import ig_enabled, ig_publisher
from wm.ports import BucketObjects, EventPublisher, IgTaskPublisher
from wm.registry.sinks import Sinks
from wm.runtime import Consumer, Services
from wm.sinks import registered_sink
from wm.sinks.monai_ig import MonaiIgSink
from wm.stores import exports, ig_exports
from wm.stores.exports import ExportTasks, announce_completion
from wm.stores.ig_exports import IgExport, IgExports, deadline_after

log = structlog.get_logger("consumers.ig_exports")

NAME = "ig-exports"
SINK_TYPE = "monai-ig"
OWNER = "monai-ig"


@dataclass(frozen=True)
class IgExportDeps:
    """The ports the IG export consumer uses."""

    tasks: ExportTasks
    handoffs: IgExports
    sinks: Sinks
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
        await announce_completion(deps.tasks, deps.bus, task)
        return
    try:
        definition = await deps.sinks.get(task.sink.name)
        sink = registered_sink(definition.type, MonaiIgSink)(definition, deps.settings)
    except (NotFound, PermanentError) as exc:
        final = await deps.tasks.record_result(
            task.export_task_id, "failed", failed_result(task.files, str(exc)).results, str(exc)
        )
        await announce_completion(deps.tasks, deps.bus, final)
        return
    hand_off = sink.hand_off(task)
    if hand_off.request is None:  # every file skipped by the sink's extensions
        outcome, results, message = final_result(task.files, hand_off.skipped)
        final = await deps.tasks.record_result(task.export_task_id, outcome, results, message)
        await announce_completion(deps.tasks, deps.bus, final)
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


async def give_up(event: ExportRequested, deps: IgExportDeps, reason: str) -> None:
    """Retries exhausted (the IG not listening, MWM's services down): the task fails with ``reason``."""
    task = await deps.tasks.get(event.export_task_id)
    final = await deps.tasks.record_result(
        task.export_task_id, "failed", failed_result(task.files, reason).results, reason
    )
    await announce_completion(deps.tasks, deps.bus, final)


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
        outcome, results, _ = final_result(
            task.files, [*record.skipped, *failed_result(task.files, reason).results]
        )
        final = await deps.tasks.record_result(task.export_task_id, outcome, results, reason)
        await announce_completion(deps.tasks, deps.bus, final)
        await deps.handoffs.resolve(record.export_task_id)
        log.warning("ig_export_overdue", export_task_id=record.export_task_id, state=final.state)
    return len(overdue)


async def sweep_overdue(deps: IgExportDeps, stop: asyncio.Event) -> None:
    """Background: look for overdue hand-offs every ``ig.sweep_interval_s``."""
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), deps.ig_settings.sweep_interval_s)
        if stop.is_set():
            return
        try:
            await fail_overdue(deps, datetime.now(UTC))
        except Exception as exc:  # a sweep that fails is tried again at the next interval
            log.warning("ig_export_sweep_failed", error=repr(exc))


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
