"""The DICOM sink: C-STORE SCU (pynetdicom) to the destination in the sink's ``args``.

For one export task:

1. Download every file from the object store into a temporary directory (streamed to disk, removed when
   the task is done) and read its file meta: SOP class and transfer syntax. A file that is missing from the
   store or is not DICOM fails alone.
2. Deal the files into at most ``export.associations_per_task`` runs (only when each run gets at least
   ``export.files_per_association`` files) and send each run over its own association, in parallel. One
   association carries all of a run's files; its presentation contexts are the run's (SOP class, transfer
   syntax) pairs, so files go as stored, never transcoded (pynetdicom streams them from the file).
3. Each C-STORE response gives the file's result: Success or Warning -> succeeded, anything else -> failed.
4. A transient failure (connection refused, association aborted, no response in time) is retried with
   exponential backoff, ``export.retry_attempts`` association attempts in all, for the files not sent yet;
   after the last one those files fail with the reason. An association *rejected* by the destination
   (wrong AE titles, calling AE not recognised) fails all remaining files at once: retrying cannot help,
   and a retry loop on rejection is how exports loop forever (MONAI Informatics Gateway #153, #200).

Sockets run with TCP_NODELAY (set when the connection opens, before the association request), so no
C-STORE waits on a delayed ACK.
"""

from __future__ import annotations

import asyncio
import socket
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_file_meta_info
from pynetdicom import AE, _config, build_context, evt
from pynetdicom.association import Association
from pynetdicom.presentation import PresentationContext
from pynetdicom.status import STATUS_SUCCESS, STATUS_WARNING, code_to_category

from schemas.applications import DicomSinkArgs, SinkDefinition
from schemas.events import FileExportResult, FileRef
from wm.config import Settings
from wm.domain.exports import split_evenly
from wm.errors import NotFound, PermanentError
from wm.sinks import ExportSink, FileSource

log = structlog.get_logger("wm.sinks.dicom")

STORED_CATEGORIES = frozenset({STATUS_SUCCESS, STATUS_WARNING})
"""C-STORE status categories that mean the destination kept the instance (warnings: coerced elements)."""
MAX_PRESENTATION_CONTEXTS = 128
MAX_MESSAGE_ID = 0xFFFF


@dataclass(frozen=True)
class LocalFile:
    """A downloaded file ready to send."""

    ref: FileRef
    path: Path
    sop_class_uid: str
    transfer_syntax_uid: str


@dataclass
class Attempt:
    """What one association did: results for the files it got through, and why it stopped early if so."""

    results: list[FileExportResult] = field(default_factory=list)
    problem: str | None = None
    rejected: bool = False


class DicomSink(ExportSink):
    """C-STORE SCU to ``definition.args`` (AE title, host, port, calling AE title)."""

    def __init__(self, definition: SinkDefinition, settings: Settings, objects: FileSource) -> None:
        super().__init__(definition, settings, objects)
        if definition.args is None:
            raise PermanentError(f"dicom sink {definition.name!r} has no args (ae_title, host, port)")
        self.args: DicomSinkArgs = definition.args
        self.export_settings = settings.export
        # Send files as stored, streamed from disk in PDU-sized chunks, never decoded into memory.
        _config.STORE_SEND_CHUNKED_DATASET = True

    @property
    def destination(self) -> str:
        """The destination as operators write it: ``AE@host:port``."""
        return f"{self.args.ae_title}@{self.args.host}:{self.args.port}"

    async def _send(self, files: Sequence[FileRef]) -> list[FileExportResult]:
        scratch_root = Path(self.settings.work_dir)
        await asyncio.to_thread(scratch_root.mkdir, parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="mwm-export-", dir=scratch_root) as scratch:
            fetched = await asyncio.gather(
                *(self._fetch(file, Path(scratch) / f"{index}.dcm") for index, file in enumerate(files))
            )
            ready = [item for item in fetched if isinstance(item, LocalFile)]
            failed = [item for item in fetched if isinstance(item, FileExportResult)]
            runs = split_evenly(
                ready, self.export_settings.associations_per_task, self.export_settings.files_per_association
            )
            sent = await asyncio.gather(*(self._send_run(run) for run in runs))
        return [*failed, *(result for run_results in sent for result in run_results)]

    async def _fetch(self, file: FileRef, path: Path) -> LocalFile | FileExportResult:
        """Download ``file`` and read its file meta; a failed result when it is missing or not DICOM."""
        try:
            await self.objects.download_file(file.key, path)
        except NotFound:
            return FileExportResult(key=file.key, status="failed", error="not found in the object store")
        try:
            meta = await asyncio.to_thread(read_file_meta_info, path)
            return LocalFile(file, path, str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID))
        except (InvalidDicomError, AttributeError, OSError) as exc:
            return FileExportResult(key=file.key, status="failed", error=f"not a DICOM file: {exc}")

    async def _send_run(self, run: list[LocalFile]) -> list[FileExportResult]:
        """Send ``run`` over one association, retrying transient failures for the files not sent yet."""
        results: list[FileExportResult] = []
        pending, attempts = run, self.export_settings.retry_attempts
        delay = self.export_settings.retry_initial_delay_s
        for attempt in range(1, attempts + 1):
            outcome = await asyncio.to_thread(self._associate_and_store, pending)
            results += outcome.results
            pending = pending[len(outcome.results) :]
            if not pending:
                return results
            problem = outcome.problem or "association ended before every file was sent"
            if outcome.rejected:
                return results + _failed(pending, problem)
            log.warning(
                "export_association_failed",
                destination=self.destination,
                attempt=attempt,
                remaining=len(pending),
                error=problem,
            )
            if attempt < attempts:
                await asyncio.sleep(delay)
                delay *= 2
        return results + _failed(pending, f"{problem} (gave up after {attempts} attempts)")

    def _associate_and_store(self, files: list[LocalFile]) -> Attempt:
        """One association (blocking; runs in a thread): associate, C-STORE each file in turn, release."""
        rejection: list[str] = []
        assoc = self._application_entity().associate(
            self.args.host,
            self.args.port,
            contexts=presentation_contexts(files),
            ae_title=self.args.ae_title,
            evt_handlers=[(evt.EVT_CONN_OPEN, _set_nodelay), (evt.EVT_ACSE_RECV, _rejection_to(rejection))],
        )
        if assoc.is_rejected:
            reason = rejection[0] if rejection else "no reason given"
            return Attempt(problem=f"association rejected by {self.destination}: {reason}", rejected=True)
        if not assoc.is_established:
            return Attempt(problem=f"no association with {self.destination} (refused, aborted or timed out)")
        try:
            return self._store_all(assoc, files)
        finally:
            if assoc.is_established:
                assoc.release()

    def _store_all(self, assoc: Association, files: list[LocalFile]) -> Attempt:
        attempt = Attempt()
        for index, item in enumerate(files):
            result = _store_one(assoc, item, index % MAX_MESSAGE_ID + 1)
            if result is None:
                attempt.problem = f"association with {self.destination} lost (aborted or no response in time)"
                return attempt
            attempt.results.append(result)
        return attempt

    def _application_entity(self) -> AE:
        ae = AE(ae_title=self.args.calling_ae_title)
        ae.acse_timeout = self.export_settings.acse_timeout_s
        ae.connection_timeout = self.export_settings.acse_timeout_s
        ae.dimse_timeout = self.export_settings.dimse_timeout_s
        ae.network_timeout = self.export_settings.dimse_timeout_s
        return ae


def presentation_contexts(files: Sequence[LocalFile]) -> list[PresentationContext]:
    """One context per (SOP class, transfer syntax) pair among ``files``, so each file goes as stored."""
    pairs = list(dict.fromkeys((item.sop_class_uid, item.transfer_syntax_uid) for item in files))
    return [build_context(sop_class, [syntax]) for sop_class, syntax in pairs[:MAX_PRESENTATION_CONTEXTS]]


def _failed(files: Sequence[LocalFile], error: str) -> list[FileExportResult]:
    return [FileExportResult(key=item.ref.key, status="failed", error=error) for item in files]


def _store_one(assoc: Association, item: LocalFile, message_id: int) -> FileExportResult | None:
    """C-STORE one file: its result, or None when the association is gone (retry the file)."""
    if not assoc.is_established:
        return None
    try:
        status = assoc.send_c_store(item.path, msg_id=message_id)
    except (ValueError, AttributeError) as exc:  # no accepted context for it, or incomplete file meta
        return FileExportResult(key=item.ref.key, status="failed", error=f"not sent: {exc}")
    if "Status" not in status:
        return None
    code = int(status.Status)
    category = code_to_category(code)
    if category in STORED_CATEGORIES:
        return FileExportResult(key=item.ref.key, status="succeeded")
    error = f"C-STORE status 0x{code:04X} ({category})"
    return FileExportResult(key=item.ref.key, status="failed", error=error)


def _set_nodelay(event: Any) -> None:
    """EVT_CONN_OPEN: no Nagle delay on the association's socket."""
    sock = event.assoc.dul.socket.socket
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _rejection_to(reasons: list[str]) -> Any:
    """An EVT_ACSE_RECV handler that appends an A-ASSOCIATE-RJ's result, source and reason to ``reasons``."""

    def record(event: Any) -> None:
        primitive = event.primitive
        if getattr(primitive, "result", None) in (0x01, 0x02):
            reasons.append(f"{primitive.result_str}, {primitive.source_str}: {primitive.reason_str}")

    return record
