"""Export sinks: where an export task's files go. Found by name through the entry-point group ``mwm.sinks``.

A sink subclasses `ExportSink` and implements ``_send``; the base class owns the per-file bookkeeping
every sink needs: files the sink's ``extensions`` leave out are reported ``skipped`` without being sent,
and every file gets exactly one result (a file the sink forgot is ``failed``, "no result").

A sink reports per-file failures in its results. A destination that stays unavailable through the sink's
own short retries (refused, aborted, timed out) raises `DestinationUnavailable` with the results of the
files it did send: the exporter tries the rest again later (a delayed redelivery, over
``export.redelivery_window_s``), holding nothing while it waits. A permanent refusal (an association
rejected) fails the files at once. ``TransientError`` means MWM's own services failed (object store down),
so the consumer's runtime retries the whole task.

A sink class declares ``settings_type`` (`wm.plugins`), the part of MWM's settings it reads, and is built
with that alone: ``Sink(definition, settings, objects)``. Register a sink type in a package's
``pyproject.toml`` (MWM's own ``dicom`` sink is declared this way)::

    [project.entry-points."mwm.sinks"]
    dicom = "wm.sinks.dicom:DicomSink"
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from importlib.metadata import entry_points
from typing import Any, ClassVar, Generic, TypeVar

from schemas.applications import SinkDefinition
from schemas.events import FileExportResult, FileRef
from wm.config import Settings
from wm.domain.exports import ExportResult, final_result, split_by_extension
from wm.errors import MwmError, PermanentError
from wm.plugins import PluginSettings, plugin_settings
from wm.ports import FileSource

__all__ = [
    "ENTRY_POINT_GROUP",
    "DestinationUnavailable",
    "ExportSink",
    "FileSource",
    "UnknownSinkType",
    "load_sink",
    "sink_class",
]

ENTRY_POINT_GROUP = "mwm.sinks"
S = TypeVar("S")
SettingsT = TypeVar("SettingsT", bound=PluginSettings)


class UnknownSinkType(PermanentError):
    """No sink implementation is registered for a sink's type."""


class DestinationUnavailable(MwmError):
    """The destination could not be reached for now; ``results``: the files dealt with before that."""

    def __init__(self, reason: str, results: Sequence[FileExportResult]) -> None:
        super().__init__(reason)
        self.reason = reason
        self.results = list(results)


class ExportSink(ABC, Generic[SettingsT]):
    """A destination for exported files, with one result per file.

    A subclass sets ``settings_type`` to its own `PluginSettings` model (``SettingsT``): what it is given
    of MWM's settings (by default, nothing).
    """

    settings_type: ClassVar[type[PluginSettings]] = PluginSettings

    def __init__(self, definition: SinkDefinition, settings: SettingsT, objects: FileSource) -> None:
        self.definition = definition
        self.settings = settings
        self.objects = objects

    async def export(self, files: Sequence[FileRef]) -> ExportResult:
        """Send the files this sink wants; the outcome, a result for every file of ``files`` (in order).

        ``DestinationUnavailable`` (with the skipped files' results too) when the destination is down.
        """
        wanted, skipped = split_by_extension(files, self.definition.extensions)
        try:
            sent = await self._send(wanted) if wanted else []
        except DestinationUnavailable as exc:
            raise DestinationUnavailable(exc.reason, [*skipped, *exc.results]) from exc
        return final_result(files, [*skipped, *sent])

    @abstractmethod
    async def _send(self, files: Sequence[FileRef]) -> list[FileExportResult]:
        """Send ``files`` (already filtered); report on each (an unreported file counts as failed)."""


def sink_class(sink_type: str) -> type[ExportSink[Any]]:
    """The sink implementation registered for ``sink_type``; ``UnknownSinkType`` when there is none."""
    return registered_sink(sink_type, ExportSink)  # type: ignore[type-abstract]


def registered_sink(sink_type: str, kind: type[S]) -> type[S]:
    """The class registered for ``sink_type``, which must be a ``kind`` (``ExportSink``, or a hand-off
    sink such as ``wm.sinks.monai_ig.MonaiIgSink`` whose results arrive later on the bus)."""
    installed = {entry.name: entry for entry in entry_points(group=ENTRY_POINT_GROUP)}
    entry = installed.get(sink_type)
    if entry is None:
        known = ", ".join(sorted(installed)) or "none"
        raise UnknownSinkType(f"no export sink of type {sink_type!r} (installed: {known})")
    loaded = entry.load()
    if not (isinstance(loaded, type) and issubclass(loaded, kind)):
        raise UnknownSinkType(f"entry point {sink_type!r} = {entry.value!r} is not a {kind.__name__}")
    return loaded


def load_sink(definition: SinkDefinition, settings: Settings, objects: FileSource) -> ExportSink[Any]:
    """An instance of the sink ``definition`` describes, reading files from ``objects``, given only the
    part of ``settings`` it declares."""
    kind = sink_class(definition.type)
    return kind(definition, plugin_settings(kind, settings), objects)
