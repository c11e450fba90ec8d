"""IG completions: record a MONAI Informatics Gateway's ``md.export.complete`` on MWM's export task.

Queue ``<bus.queue_prefix>.ig-completions`` on the IG's broker (``ig.vhost``), bound to ``ig.exchange``
with ``ig.export_complete_key``: MWM's own queue beside a Workflow Manager's.

- In: ``ExportCompleteEvent`` (``status`` by name or integer, ``file_statuses`` integers or names, or
  absent as from IG 0.3.0-0.3.1).
- Decisions: the task must be one MWM handed to the IG (``wm.stores.ig_exports``) under the same workflow
  instance id (MWM's job id); a completion for any other task is a Workflow Manager's: acknowledged and
  ignored. ``wm.domain.monai_ig.completion_result`` maps the statuses to MWM's outcome and a result per
  file (the IG keys mapped back to MWM's).
- Effects: the task's final state and per-file results; ``ExportCompleted`` on MWM's bus (message id
  ``<task id>.completed``, an outbox as the exporter's) by the one handler that claims its announcement
  (``wm.stores.ig_exports.announce_once``); the hand-off is resolved.
- Idempotency: a final task keeps its first result; a duplicate completion (IG 0.5 publishes before it
  acks) changes nothing, and of two handled at once only one publishes ``ExportCompleted``.
- Failure: a message lacking a required property, or whose body does not parse, is dead-lettered with
  the reason; database or broker outages are retried.
"""

from __future__ import annotations

from dataclasses import dataclass

import structlog

from schemas.monai_ig import ExportCompleteEvent
from wm.domain.monai_ig import completion_result
from wm.errors import NotFound
from wm.ig_queues import ig_enabled, ig_queue
from wm.ports import EventPublisher, ExportTaskRecords, IgExportRecords
from wm.runtime import Consumer, Services
from wm.stores import exports, ig_exports
from wm.stores.exports import ExportTasks
from wm.stores.ig_exports import IgExports, announce_once

log = structlog.get_logger("consumers.ig_completions")

NAME = "ig-completions"


@dataclass(frozen=True)
class IgCompletionDeps:
    """The ports the IG completion consumer uses."""

    tasks: ExportTaskRecords
    handoffs: IgExportRecords
    bus: EventPublisher


async def handle(completion: ExportCompleteEvent, deps: IgCompletionDeps) -> None:
    """Make the task final with the IG's statuses and announce it."""
    try:
        record = await deps.handoffs.get(completion.export_task_id)
    except NotFound:
        record = None
    if record is None or record.job_id != completion.workflow_instance_id:
        log.info(
            "ig_completion_ignored",
            export_task_id=completion.export_task_id,
            workflow_instance_id=completion.workflow_instance_id,
            reason="not a task MWM handed to the IG",
        )
        return
    outcome, results, message = completion_result(completion, record.sent, record.skipped)
    final = await deps.tasks.record_result(completion.export_task_id, outcome, results, message)
    if final.state != outcome:
        log.info("ig_completion_after_final", export_task_id=final.export_task_id, state=final.state)
    announced = await announce_once(deps.tasks, deps.handoffs, deps.bus, final)
    await deps.handoffs.resolve(completion.export_task_id)
    log.info(
        "ig_export_completed",
        export_task_id=final.export_task_id,
        outcome=final.state,
        files=len(results),
        announced=announced,
    )


def build(services: Services) -> IgCompletionDeps:
    """Wire the ports to the process's shared connections."""
    return IgCompletionDeps(ExportTasks(services.database), IgExports(services.database), services.bus)


CONSUMER = Consumer[IgCompletionDeps](
    name=NAME,
    handlers={ExportCompleteEvent: handle},
    build_deps=build,
    routing_keys=("md.export.complete",),
    indexes=(*exports.INDEXES, *ig_exports.INDEXES),
    source=ig_queue(ExportCompleteEvent, lambda ig: ig.export_complete_key),
    enabled_when=ig_enabled,
)
