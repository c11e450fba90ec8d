"""The DICOM sink: C-STORE SCU (pynetdicom) to the destination in the sink's ``args``.

For one export task, downloading and sending overlap:

1. A download task fetches the files from the object store (``object_store.workers`` at a time, streamed
   to a temporary directory removed when the task is done), reads each file's meta (SOP class, transfer
   syntax) and puts it on a bounded queue (`PREFETCH` files ahead of the senders). A file that is missing
   from the store or is not DICOM fails alone.
2. As soon as the first file is there, up to the sink's ``max_associations`` lanes (default 1: what the
   destination accepts; at most ``export.associations_per_task``; only as many as get at least
   ``export.files_per_association`` files each) open one association each and send files from the
   queue as they come. Presentation contexts are known up front: the first file's (SOP class, transfer
   syntax) and the common storage classes (CT, MR, SC, SEG, RT, SR, PDF) in its syntax and the two little
   endian ones, so files go as stored, never transcoded (pynetdicom streams them from the file). Files
   whose pair the destination did not accept are sent at the end over an association proposing exactly
   their pairs.
3. Each C-STORE response gives the file's result: Success or Warning -> succeeded, anything else -> failed.
4. A transient failure (connection refused, association aborted, no response in time) is retried by the
   lane with exponential backoff, ``export.retry_attempts`` association attempts in all; the file in hand
   is sent again. When a lane gave up (or the destination answered "out of resources", 0xA7xx), the sink
   raises ``DestinationUnavailable`` with the results of the files that got through: the exporter sends
   the rest again after a delay (``wm.stores.export_retry``), over ``export.redelivery_window_s``. An
   association
   *rejected* by the destination (wrong AE titles, calling AE not recognised) stops the export at once and
   fails every file not sent: retrying cannot help, and a retry loop on rejection is how exports loop
   forever (MONAI Informatics Gateway #153, #200).

Sockets run with TCP_NODELAY (set when the connection opens, before the association request), so no
C-STORE waits on a delayed ACK. A C-STORE response that pynetdicom's association reactor takes by mistake
goes back to the waiting ``send_c_store`` (`wm.pynetdicom_patches.keep_responses`), instead of a 30 s DIMSE
timeout and abort.

Cost (issue #6, 324 CT slices, 164 MB, dcmtk storescp with its 16 KB maximum PDU): pynetdicom spends about
2.2 s of CPU per study sending from local files (about 10,000 P-DATA PDUs through its DUL thread, one
Python round trip each), the S3 download 1.0 to 2.2 s more, on one GIL: parallel associations overlap
round trips, not CPU.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import tempfile
from collections.abc import Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
from pydicom.errors import InvalidDicomError
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, _config, build_context, evt
from pynetdicom.association import Association
from pynetdicom.dsutils import split_dataset
from pynetdicom.presentation import PresentationContext
from pynetdicom.status import STATUS_SUCCESS, STATUS_WARNING, code_to_category

from schemas.applications import DicomSinkArgs, SinkDefinition
from schemas.events import FileExportResult, FileRef
from wm.config import Settings
from wm.domain.exports import lane_count
from wm.errors import MwmError, NotFound, PermanentError
from wm.pynetdicom_patches import check_version, dul_socket, keep_responses
from wm.sinks import DestinationUnavailable, ExportSink, FileSource

log = structlog.get_logger("wm.sinks.dicom")

STORED_CATEGORIES = frozenset({STATUS_SUCCESS, STATUS_WARNING})
"""C-STORE status categories that mean the destination kept the instance (warnings: coerced elements)."""
MAX_PRESENTATION_CONTEXTS = 128
MAX_MESSAGE_ID = 0xFFFF
PREFETCH = 32
"""Files downloaded ahead of the lanes at most (bounds the scratch space a slow destination fills)."""
LITTLE_ENDIAN = (str(ExplicitVRLittleEndian), str(ImplicitVRLittleEndian))
COMMON_STORAGE_CLASSES = (
    "1.2.840.10008.5.1.4.1.1.2",  # CT Image Storage
    "1.2.840.10008.5.1.4.1.1.2.1",  # Enhanced CT Image Storage
    "1.2.840.10008.5.1.4.1.1.4",  # MR Image Storage
    "1.2.840.10008.5.1.4.1.1.4.1",  # Enhanced MR Image Storage
    "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture Image Storage
    "1.2.840.10008.5.1.4.1.1.66.4",  # Segmentation Storage
    "1.2.840.10008.5.1.4.1.1.481.3",  # RT Structure Set Storage
    "1.2.840.10008.5.1.4.1.1.88.11",  # Basic Text SR Storage
    "1.2.840.10008.5.1.4.1.1.88.33",  # Comprehensive SR Storage
    "1.2.840.10008.5.1.4.1.1.104.1",  # Encapsulated PDF Storage
)
"""Proposed on every association besides the first file's class: most outputs need no second one."""
OUT_OF_RESOURCES = "C-STORE status 0xA7"
"""How the result of a file refused for lack of resources begins (0xA7xx, PS3.4 B.2.3: full for now)."""


@dataclass(frozen=True)
class LocalFile:
    """A downloaded file ready to send."""

    ref: FileRef
    path: Path
    sop_class_uid: str
    transfer_syntax_uid: str


@dataclass
class Pipeline:
    """Downloaded files on their way to the lanes, and what stops them early.

    The feed ends with ``None``, which every lane sees (a lane that reads it puts it back). The download
    takes a slot per file and a lane gives it back when it takes the file: at most `PREFETCH` files wait.
    """

    feed: asyncio.Queue[LocalFile | None] = field(default_factory=asyncio.Queue)
    slots: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(PREFETCH))
    outliers: list[LocalFile] = field(default_factory=list)
    stopped: str | None = None
    """Set when the destination rejected the association: every lane stops."""
    gave_up: str | None = None
    """The reason of the last lane that gave up."""
    unsent: set[str] = field(default_factory=set)
    """Keys of the files a lane gave up on (the destination unavailable): worth sending again."""

    async def next(self) -> LocalFile | None:
        """The next file to send; None at the end of the feed or once the export is stopped."""
        if self.stopped:
            return None
        item = await self.feed.get()
        if item is None:
            self.feed.put_nowait(None)
        else:
            self.slots.release()
        return item

    @classmethod
    def of(cls, files: Sequence[LocalFile]) -> Pipeline:
        """A pipeline whose feed already holds ``files`` (and its end)."""
        pipeline = cls()
        for item in [*files, None]:
            pipeline.feed.put_nowait(item)
        return pipeline


@dataclass
class Session:
    """An association attempt: the association when established, else why not."""

    assoc: Association | None = None
    problem: str = ""
    rejected: bool = False


class DicomSink(ExportSink):
    """C-STORE SCU to ``definition.args`` (AE title, host, port, calling AE title)."""

    def __init__(self, definition: SinkDefinition, settings: Settings, objects: FileSource) -> None:
        super().__init__(definition, settings, objects)
        if not isinstance(definition.args, DicomSinkArgs):
            raise PermanentError(f"dicom sink {definition.name!r} has no args (ae_title, host, port)")
        self.args: DicomSinkArgs = definition.args
        self.export_settings = settings.export
        check_version()
        # Send files as stored, streamed from disk in PDU-sized chunks, never decoded into memory.
        _config.STORE_SEND_CHUNKED_DATASET = True

    @property
    def destination(self) -> str:
        """The destination as operators write it: ``AE@host:port``."""
        return f"{self.args.ae_title}@{self.args.host}:{self.args.port}"

    async def _send(self, files: Sequence[FileRef]) -> list[FileExportResult]:
        scratch_root = Path(self.settings.work_dir)
        await asyncio.to_thread(scratch_root.mkdir, parents=True, exist_ok=True)
        settings = self.export_settings
        most = min(self.args.max_associations, settings.associations_per_task)
        lanes = lane_count(len(files), most, settings.files_per_association)
        pipeline = Pipeline()
        fetch_failures: list[FileExportResult] = []
        with (
            tempfile.TemporaryDirectory(prefix="mwm-export-", dir=scratch_root) as scratch,
            ThreadPoolExecutor(lanes, thread_name_prefix="mwm-scu") as pool,
        ):
            download = asyncio.create_task(self._download(files, Path(scratch), pipeline, fetch_failures))
            try:
                sent = await self._send_feed(pipeline, lanes, pool)
            finally:
                download.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await download
        results = [*fetch_failures, *sent]
        if not pipeline.stopped:  # down or full for now: the files not sent go again later
            kept = [r for r in results if not _worth_resending(r, pipeline.unsent)]
            if pipeline.gave_up or len(kept) < len(results):
                raise DestinationUnavailable(
                    pipeline.gave_up or f"{self.destination} is out of resources", kept
                )
        reason = pipeline.stopped or "export stopped"
        reported = {result.key for result in results}
        return results + [_failure(file.key, reason) for file in files if file.key not in reported]

    async def _download(
        self, files: Sequence[FileRef], scratch: Path, pipeline: Pipeline, failures: list[FileExportResult]
    ) -> None:
        """Fetch ``files`` into ``scratch``, a few at a time, onto the pipeline's feed; then end the feed."""
        in_flight = asyncio.Semaphore(self.settings.object_store.workers)

        async def one(index: int, file: FileRef) -> None:
            await pipeline.slots.acquire()
            async with in_flight:
                item = await self._fetch(file, scratch / f"{index}.dcm")
            if isinstance(item, LocalFile):
                pipeline.feed.put_nowait(item)
            else:
                pipeline.slots.release()
                failures.append(item)

        try:
            async with asyncio.TaskGroup() as group:
                for index, file in enumerate(files):
                    group.create_task(one(index, file))
        except* MwmError as errors:  # the object store is down: the runtime retries the task
            raise errors.exceptions[0] from None
        finally:
            pipeline.feed.put_nowait(None)  # the lanes end, whatever happened

    async def _send_feed(self, pipeline: Pipeline, lanes: int, pool: Executor) -> list[FileExportResult]:
        """Send the feed over ``lanes`` associations, then any outliers over one proposing their pairs."""
        first = await pipeline.next()
        if first is None:
            return []
        contexts = presentation_contexts([first], common=True)
        sent = await asyncio.gather(
            *(self._lane(pipeline, contexts, pool, [first] if lane == 0 else []) for lane in range(lanes))
        )
        results = [result for lane in sent for result in lane]
        if pipeline.outliers and not pipeline.stopped:
            outliers = Pipeline.of(pipeline.outliers)
            results += await self._lane(outliers, presentation_contexts(pipeline.outliers), pool, [])
            pipeline.stopped, pipeline.gave_up = outliers.stopped, outliers.gave_up or pipeline.gave_up
        return results

    async def _lane(
        self,
        pipeline: Pipeline,
        contexts: list[PresentationContext],
        pool: Executor,
        carried: list[LocalFile],
    ) -> list[FileExportResult]:
        """One association at a time sending ``carried``, then the feed; reconnects with backoff."""
        loop = asyncio.get_running_loop()
        results: list[FileExportResult] = []
        attempts, delay = self.export_settings.retry_attempts, self.export_settings.retry_initial_delay_s
        for attempt in range(1, attempts + 1):
            session = await loop.run_in_executor(pool, self._associate, contexts)
            if session.rejected:
                pipeline.stopped = session.problem
                return results + [_failure(item.ref.key, session.problem) for item in carried]
            if session.assoc is not None:
                ended = await self._pump(session.assoc, pipeline, carried, results, pool)
                if ended:
                    return results
            problem = session.problem or f"association with {self.destination} lost (aborted or no response)"
            log.warning(
                "export_association_failed", destination=self.destination, attempt=attempt, error=problem
            )
            if attempt < attempts:
                await asyncio.sleep(delay)
                delay *= 2
        pipeline.gave_up = f"{problem} (gave up after {attempts} attempts)"
        pipeline.unsent.update(item.ref.key for item in carried)
        return results + [_failure(item.ref.key, pipeline.gave_up) for item in carried]

    async def _pump(
        self,
        assoc: Association,
        pipeline: Pipeline,
        carried: list[LocalFile],
        results: list[FileExportResult],
        pool: Executor,
    ) -> bool:
        """Send files over ``assoc`` until the feed ends (True) or the association is lost (False).

        A file the association could not take stays in ``carried`` for the next association.
        """
        loop = asyncio.get_running_loop()
        accepted = {(cx.abstract_syntax, cx.transfer_syntax[0]) for cx in assoc.accepted_contexts}
        try:
            while (item := carried.pop(0) if carried else await pipeline.next()) is not None:
                if (item.sop_class_uid, item.transfer_syntax_uid) not in accepted:
                    pipeline.outliers.append(item)
                    continue
                result = await loop.run_in_executor(
                    pool, _store_one, assoc, item, len(results) % MAX_MESSAGE_ID + 1
                )
                if result is None:
                    carried.append(item)
                    return False
                results.append(result)
            return True
        finally:
            if assoc.is_established:
                await loop.run_in_executor(pool, assoc.release)

    async def _fetch(self, file: FileRef, path: Path) -> LocalFile | FileExportResult:
        """Download ``file`` and read its file meta; a failed result when it is missing or not DICOM."""
        try:
            await self.objects.download_file(file.key, path)
        except NotFound:
            return _failure(file.key, "not found in the object store")
        try:
            meta, _ = await asyncio.to_thread(split_dataset, path)  # a third of read_file_meta_info's CPU
            return LocalFile(file, path, str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID))
        except (InvalidDicomError, AttributeError, OSError) as exc:
            return _failure(file.key, f"not a DICOM file: {exc}")

    def _associate(self, contexts: list[PresentationContext]) -> Session:
        """Request an association (blocking; runs in a lane's thread)."""
        rejection: list[str] = []
        assoc = self._application_entity().associate(
            self.args.host,
            self.args.port,
            contexts=contexts,
            ae_title=self.args.ae_title,
            evt_handlers=[(evt.EVT_CONN_OPEN, _set_nodelay), (evt.EVT_ACSE_RECV, _rejection_to(rejection))],
        )
        if assoc.is_rejected:
            reason = rejection[0] if rejection else "no reason given"
            return Session(problem=f"association rejected by {self.destination}: {reason}", rejected=True)
        if not assoc.is_established:
            return Session(problem=f"no association with {self.destination} (refused, aborted or timed out)")
        keep_responses(assoc)
        return Session(assoc)

    def _application_entity(self) -> AE:
        ae = AE(ae_title=self.args.calling_ae_title)
        ae.acse_timeout = self.export_settings.acse_timeout_s
        ae.connection_timeout = self.export_settings.acse_timeout_s
        ae.dimse_timeout = self.export_settings.dimse_timeout_s
        ae.network_timeout = self.export_settings.dimse_timeout_s
        return ae


def presentation_contexts(files: Sequence[LocalFile], common: bool = False) -> list[PresentationContext]:
    """One context per (SOP class, transfer syntax) pair among ``files``, so each file goes as stored.

    With ``common``, also the common storage classes in the files' syntaxes and the little endian ones.
    """
    pairs = [(item.sop_class_uid, item.transfer_syntax_uid) for item in files]
    if common:
        syntaxes = [*dict.fromkeys(syntax for _, syntax in pairs), *LITTLE_ENDIAN]
        pairs += [(sop_class, syntax) for sop_class in COMMON_STORAGE_CLASSES for syntax in syntaxes]
    unique = list(dict.fromkeys(pairs))[:MAX_PRESENTATION_CONTEXTS]
    return [build_context(sop_class, [syntax]) for sop_class, syntax in unique]


def _worth_resending(result: FileExportResult, unsent: set[str]) -> bool:
    """A failure worth sending again: the file never got through, or the destination was out of resources.

    Every other failure status is the destination's verdict on the file.
    """
    if result.status != "failed":
        return False
    return result.key in unsent or (result.error or "").startswith(OUT_OF_RESOURCES)


def _failure(key: str, error: str) -> FileExportResult:
    return FileExportResult(key=key, status="failed", error=error)


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
    sock = dul_socket(event.assoc)
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _rejection_to(reasons: list[str]) -> Any:
    """An EVT_ACSE_RECV handler that appends an A-ASSOCIATE-RJ's result, source and reason to ``reasons``."""

    def record(event: Any) -> None:
        primitive = event.primitive
        if getattr(primitive, "result", None) in (0x01, 0x02):
            reasons.append(f"{primitive.result_str}, {primitive.source_str}: {primitive.reason_str}")

    return record
