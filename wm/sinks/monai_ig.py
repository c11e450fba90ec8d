"""The ``monai-ig`` sink: hand an export task to a MONAI Informatics Gateway, which sends it and reports back.

Unlike a sink MWM runs itself (``ExportSink``), this one only prepares the hand-off: which of the task's
files go (the sink's ``extensions``), their de-duplicated keys in the IG's bucket (copied there when they
live elsewhere), and the ``ExportRequestEvent`` for ``<export_request_prefix>.<agent>``. The consumer
``consumers.ig_exports`` copies and publishes it once per task; ``consumers.ig_completions`` records the
IG's ``md.export.complete``. Registered under ``mwm.sinks`` as ``monai-ig``.
"""

from __future__ import annotations

from dataclasses import dataclass

from schemas.applications import MonaiIgSinkArgs, SinkDefinition
from schemas.events import FileExportResult, FileRef
from schemas.monai_ig import ExportRequestEvent
from wm.domain.exports import ExportTask, split_by_extension
from wm.domain.monai_ig import ig_keys
from wm.errors import PermanentError
from wm.plugins import PluginSettings


class IgHandOffSettings(PluginSettings):
    """Of the IG's settings, what a hand-off names: where its export service listens, and its bucket."""

    export_request_prefix: str
    bucket: str


class MonaiIgSinkSettings(PluginSettings):
    """What the ``monai-ig`` sink reads of MWM's settings (not the IG broker's URL and credentials)."""

    ig: IgHandOffSettings


@dataclass(frozen=True)
class HandOff:
    """What handing a task to the IG takes: files to place in its bucket, the request, the skipped files.

    ``request`` is None when the sink's ``extensions`` leave no file to send.
    """

    copies: dict[str, FileRef]
    routing_key: str
    request: ExportRequestEvent | None
    skipped: list[FileExportResult]


class MonaiIgSink:
    """Export through a MONAI Informatics Gateway (``args``: agent, destinations, plug-in assemblies)."""

    settings_type = MonaiIgSinkSettings

    def __init__(self, definition: SinkDefinition, settings: MonaiIgSinkSettings) -> None:
        if not isinstance(definition.args, MonaiIgSinkArgs):
            raise PermanentError(f"monai-ig sink {definition.name!r} has no args (agent, destinations)")
        self.definition = definition
        self.args: MonaiIgSinkArgs = definition.args
        self.ig = settings.ig

    @property
    def routing_key(self) -> str:
        """Where the gateway's export service for this agent reads its requests."""
        return f"{self.ig.export_request_prefix}.{self.args.agent}"

    def hand_off(self, task: ExportTask) -> HandOff:
        """The hand-off of ``task``: its workflow instance id is the job id, its task id MWM's."""
        wanted, skipped = split_by_extension(task.files, self.definition.extensions)
        copies = ig_keys(task.export_task_id, wanted, self.ig.bucket)
        request = None
        if copies:
            request = ExportRequestEvent(
                workflow_instance_id=task.job_id,
                export_task_id=task.export_task_id,
                files=list(copies),
                destinations=list(self.args.destinations),
                correlation_id=task.correlation_id,
                plug_in_assemblies=list(self.args.plug_in_assemblies),
            )
        return HandOff(copies, self.routing_key, request, skipped)
