"""Export sinks: where an export task's files go. Found by name through the entry-point group ``mwm.sinks``.

A sink subclasses `ExportSink` and implements ``_send``; the base class owns the per-file bookkeeping
every sink needs: files the sink's ``extensions`` leave out are reported ``skipped`` without being sent,
and every file gets exactly one result (a file the sink forgot is ``failed``, "no result").

A sink reports per-file failures in its results (a destination that stays down fails the files, after the
sink's own bounded retries); it raises ``TransientError`` only when MWM's own services fail (object store
down), so the consumer's runtime retries the whole task.

Register a sink type in a package's ``pyproject.toml``::

    [project.entry-points."mwm.sinks"]
    dicom = "wm.sinks.dicom:DicomSink"

The built-in ``dicom`` and ``monai-ig`` sinks are found even when MWM runs from a source tree (no installed
entry points).
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Sequence
from importlib.metadata import entry_points
from pathlib import Path
from typing import Protocol, TypeVar

from schemas.applications import SinkDefinition
from schemas.events import FileExportResult, FileRef
from wm.config import Settings
from wm.domain.exports import complete_results, split_by_extension
from wm.errors import PermanentError

ENTRY_POINT_GROUP = "mwm.sinks"
S = TypeVar("S")
BUILT_IN: dict[str, str] = {"dicom": "wm.sinks.dicom:DicomSink", "monai-ig": "wm.sinks.monai_ig:MonaiIgSink"}
"""Sink types shipped with MWM, as ``module:attribute``; installed entry points take precedence."""


class FileSource(Protocol):
    """Where a sink reads the files it exports (``wm.adapters.objectstore.ObjectStore``)."""

    async def download_file(self, key: str, path: Path) -> None:
        """Download the object ``key`` to the local file ``path``."""
        ...


class UnknownSinkType(PermanentError):
    """No sink implementation is registered for a sink's type."""


class ExportSink(ABC):
    """A destination for exported files, with one result per file."""

    def __init__(self, definition: SinkDefinition, settings: Settings, objects: FileSource) -> None:
        self.definition = definition
        self.settings = settings
        self.objects = objects

    async def export(self, files: Sequence[FileRef]) -> list[FileExportResult]:
        """Send the files this sink wants; a result for every file of ``files``, in order."""
        wanted, skipped = split_by_extension(files, self.definition.extensions)
        sent = await self._send(wanted) if wanted else []
        return complete_results(files, [*skipped, *sent])

    @abstractmethod
    async def _send(self, files: Sequence[FileRef]) -> list[FileExportResult]:
        """Send ``files`` (already filtered); report on each (an unreported file counts as failed)."""


def sink_class(sink_type: str) -> type[ExportSink]:
    """The sink implementation registered for ``sink_type``; ``UnknownSinkType`` when there is none."""
    return registered_sink(sink_type, ExportSink)  # type: ignore[type-abstract]


def registered_sink(sink_type: str, kind: type[S]) -> type[S]:
    """The class registered for ``sink_type``, which must be a ``kind`` (``ExportSink``, or a hand-off
    sink such as ``wm.sinks.monai_ig.MonaiIgSink`` whose results arrive later on the bus)."""
    installed = {entry.name: entry.value for entry in entry_points(group=ENTRY_POINT_GROUP)}
    target = installed.get(sink_type) or BUILT_IN.get(sink_type)
    if target is None:
        known = sorted({*installed, *BUILT_IN})
        raise UnknownSinkType(f"no export sink of type {sink_type!r} (known: {', '.join(known)})")
    module_name, _, attribute = target.partition(":")
    loaded = getattr(importlib.import_module(module_name), attribute)
    if not (isinstance(loaded, type) and issubclass(loaded, kind)):
        raise UnknownSinkType(f"entry point {sink_type!r} = {target!r} is not a {kind.__name__}")
    return loaded


def load_sink(definition: SinkDefinition, settings: Settings, objects: FileSource) -> ExportSink:
    """An instance of the sink ``definition`` describes, reading files from ``objects``."""
    return sink_class(definition.type)(definition, settings, objects)
