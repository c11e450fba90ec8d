"""The DICOM sink: C-STORE SCU to the destination in the sink's ``args``.

For one export task, downloading and sending overlap:

1. A download task fetches the files from the object store (``object_store.workers`` at a time; held in
   memory or streamed to a temporary directory removed when the task is done, `wm.sinks.dicom_files`),
   reads each file's meta (SOP class, transfer syntax) and puts it on a bounded queue (`PREFETCH` files
   ahead of the senders). A file that is missing from the store or is not DICOM fails alone.
2. As soon as the first file is there, up to the sink's ``max_associations`` lanes (default 1: what the
   destination accepts; at most ``export.associations_per_task``; only as many as get at least
   ``export.files_per_association`` files each) open one association each and send files from the
   queue as they come. Presentation contexts are known up front: the first file's (SOP class, transfer
   syntax) and the common storage classes (CT, MR, SC, SEG, RT, SR, PDF) in its syntax and the two little
   endian ones, so files go as stored, never transcoded (streamed from the file). Files
   whose pair the destination did not accept are sent at the end over an association proposing exactly
   their pairs.
3. Each C-STORE response gives the file's result: Success or Warning -> succeeded, anything else -> failed.
4. A transient failure (connection refused, association aborted, no response in time) is retried by the
   lane with the shared backoff (``wm.domain.backoff``), ``export.retry_attempts`` tries; the file in hand
   is sent again. When a lane gave up (or the destination answered "out of resources", 0xA7xx), the sink
   raises ``DestinationUnavailable`` with the results of the files that got through: the exporter sends
   the rest again after a delay (``wm.stores.export_retry``), over ``export.redelivery_window_s``. An
   association
   *rejected* by the destination (wrong AE titles, calling AE not recognised) stops the export at once and
   fails every file not sent: retrying cannot help, and a retry loop on rejection is how exports loop
   forever (MONAI Informatics Gateway #153, #200).

Who sends (``export.sender``, a `wm.sinks.dicom_lanes.SendLane` per lane): ``wire`` (default,
`wm.sinks.dicom_wire`) writes each file's stored bytes from the exporter's event loop; ``pynetdicom`` runs
pynetdicom's SCU in a thread per lane, or with ``export.send_processes`` in a process per lane
(`wm.sinks.dicom_lanes`). Both map results, rejections and aborts the same way (the unit tests compare
them). Sockets run with TCP_NODELAY (set before the association request), so no C-STORE waits on a
delayed ACK.

Cost (324 CT slices, 170 MB, dcmtk storescp with its 16 KB maximum PDU): pynetdicom spends about 2.2 s of
CPU sending them from local files (about 10,000 P-DATA PDUs through its DUL thread), the wire sender
about 0.45 s; the download of the study costs about 0.6 s more (bench/README.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import structlog
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from schemas.applications import DicomSinkArgs, SinkDefinition
from schemas.events import FileExportResult, FileRef
from wm.config import ExportSettings
from wm.domain.backoff import delay_s
from wm.domain.exports import lane_count
from wm.errors import MwmError, PermanentError
from wm.plugins import PluginSettings
from wm.pynetdicom_patches import check_version
from wm.sinks import DestinationUnavailable, ExportSink, FileSource
from wm.sinks.dicom_files import failure, fetch
from wm.sinks.dicom_lanes import ExecutorLane, LocalFile, SendLane
from wm.sinks.dicom_wire import WireLane

log = structlog.get_logger("wm.sinks.dicom")

MAX_PRESENTATION_CONTEXTS = 128
Pair = tuple[str, str]
"""(SOP class UID, transfer syntax UID): one presentation context."""
PREFETCH = 32
BATCH = 16
"""Files handed to a lane's worker at once, when that many are waiting (one hand-off, not one a file)."""
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
    fetches: set[asyncio.Future[LocalFile | FileExportResult]] = field(default_factory=set)
    """Downloads in flight: their threads write into the scratch directory even after a cancel."""

    async def next(self) -> LocalFile | None:
        """The next file to send; None at the end of the feed or once the export is stopped."""
        if self.stopped:
            return None
        return self._took(await self.feed.get())

    def ready(self) -> LocalFile | None:
        """The next file if one is waiting (None if none is, at the end, or once stopped)."""
        if self.stopped or self.feed.empty():
            return None
        return self._took(self.feed.get_nowait())

    def _took(self, item: LocalFile | None) -> LocalFile | None:
        if item is None:
            self.feed.put_nowait(None)  # the end, for every lane
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


class Downloads(PluginSettings):
    """How many files the sink fetches from the object store at a time (its client comes with ``objects``)."""

    workers: int


class DicomSinkSettings(PluginSettings):
    """What the DICOM sink reads of MWM's settings: the export section, its scratch space, its downloads."""

    export: ExportSettings
    work_dir: str
    object_store: Downloads


class DicomSink(ExportSink[DicomSinkSettings]):
    """C-STORE SCU to ``definition.args`` (AE title, host, port, calling AE title)."""

    settings_type = DicomSinkSettings

    def __init__(self, definition: SinkDefinition, settings: DicomSinkSettings, objects: FileSource) -> None:
        super().__init__(definition, settings, objects)
        if not isinstance(definition.args, DicomSinkArgs):
            raise PermanentError(f"dicom sink {definition.name!r} has no args (ae_title, host, port)")
        self.args: DicomSinkArgs = definition.args
        self.export_settings = settings.export
        check_version()

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
        senders = [self._new_lane() for _ in range(lanes)]
        pipeline = Pipeline()
        fetch_failures: list[FileExportResult] = []
        with tempfile.TemporaryDirectory(prefix="mwm-export-", dir=scratch_root) as scratch:
            download = asyncio.create_task(self._download(files, Path(scratch), pipeline, fetch_failures))
            try:
                sent = await self._send_feed(pipeline, senders)
            finally:
                download.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await download
                # A cancelled download's thread still writes its file: let it land before the scratch
                # directory goes (else its removal finds a new file and fails).
                await asyncio.gather(*pipeline.fetches, return_exceptions=True)
                # Lanes release their associations before they return; on cancellation a lane aborts
                # its association (a worker ends once its current C-STORE does).
                for sender in senders:
                    sender.close()
        results = [*fetch_failures, *sent]
        if not pipeline.stopped:  # down or full for now: the files not sent go again later
            kept = [r for r in results if not _worth_resending(r, pipeline.unsent)]
            if pipeline.gave_up or len(kept) < len(results):
                raise DestinationUnavailable(
                    pipeline.gave_up or f"{self.destination} is out of resources", kept
                )
        reason = pipeline.stopped or "export stopped"
        reported = {result.key for result in results}
        return results + [failure(file.key, reason) for file in files if file.key not in reported]

    def _new_lane(self) -> SendLane:
        """A lane of the configured kind (``export.sender``)."""
        if self.export_settings.sender == "wire":
            return WireLane(self.args, self.export_settings)
        return ExecutorLane(self.args, self.export_settings)

    async def _download(
        self, files: Sequence[FileRef], scratch: Path, pipeline: Pipeline, failures: list[FileExportResult]
    ) -> None:
        """Fetch ``files`` into ``scratch``, a few at a time, onto the pipeline's feed; then end the feed."""
        in_flight = asyncio.Semaphore(self.settings.object_store.workers)

        async def one(index: int, file: FileRef) -> None:
            await pipeline.slots.acquire()
            async with in_flight:
                path = scratch / f"{index}.dcm"
                download = asyncio.ensure_future(fetch(self.objects, file, path, self.export_settings))
                pipeline.fetches.add(download)
                download.add_done_callback(pipeline.fetches.discard)
                item = await asyncio.shield(download)
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

    async def _send_feed(self, pipeline: Pipeline, lanes: list[SendLane]) -> list[FileExportResult]:
        """Send the feed over one association per lane, then any outliers over one proposing their pairs."""
        first = await pipeline.next()
        if first is None:
            return []
        pairs = presentation_contexts([first], common=True)
        carried = [[first]] + [[] for _ in lanes[1:]]
        sent = await asyncio.gather(*map(partial(self._lane, pipeline, pairs), lanes, carried))
        results = [result for lane in sent for result in lane]
        if pipeline.outliers and not pipeline.stopped:
            outliers = Pipeline.of(pipeline.outliers)
            results += await self._lane(outliers, presentation_contexts(pipeline.outliers), lanes[0], [])
            pipeline.stopped, pipeline.gave_up = outliers.stopped, outliers.gave_up or pipeline.gave_up
        return results

    async def _lane(
        self, pipeline: Pipeline, pairs: list[Pair], lane: SendLane, carried: list[LocalFile]
    ) -> list[FileExportResult]:
        """One association at a time (held by ``lane``) sending ``carried``, then the feed; reconnects
        with backoff."""
        results: list[FileExportResult] = []
        policy = self.export_settings
        attempts = policy.retry_attempts
        for attempt in range(1, attempts + 1):
            opened = await lane.open(pairs)
            if opened.rejected:
                pipeline.stopped = opened.problem
                return results + [failure(item.ref.key, opened.problem) for item in carried]
            if opened.established:
                ended = await self._pump(opened.accepted, pipeline, carried, results, lane)
                if ended:
                    return results
            problem = opened.problem or f"association with {self.destination} lost (aborted or no response)"
            log.warning(
                "export_association_failed", destination=self.destination, attempt=attempt, error=problem
            )
            if attempt < attempts:
                await asyncio.sleep(delay_s(attempt, policy.retry_initial_delay_s, policy.retry_max_delay_s))
        pipeline.gave_up = f"{problem} (gave up after {attempts} attempts)"
        pipeline.unsent.update(item.ref.key for item in carried)
        return results + [failure(item.ref.key, pipeline.gave_up) for item in carried]

    async def _pump(
        self,
        accepted: frozenset[Pair],
        pipeline: Pipeline,
        carried: list[LocalFile],
        results: list[FileExportResult],
        lane: SendLane,
    ) -> bool:
        """Send files over the lane's association until the feed ends (True) or it is lost (False).

        A file the association could not take stays in ``carried`` for the next association.
        """
        try:
            while batch := await self._batch(accepted, pipeline, carried):
                sent = await lane.store_all(batch, len(results))
                results.extend(sent)
                if len(sent) < len(batch):
                    carried[:0] = batch[len(sent) :]
                    return False
            return True
        finally:
            await lane.release()

    @staticmethod
    async def _batch(
        accepted: frozenset[Pair], pipeline: Pipeline, carried: list[LocalFile]
    ) -> list[LocalFile]:
        """The carried files, else the next file to send and those already waiting behind it (up to
        `BATCH`): one hand-off to the lane's worker for all of them. Empty at the end of the feed."""
        batch: list[LocalFile] = []
        while len(batch) < BATCH:
            if carried:
                item: LocalFile | None = carried.pop(0)
            elif not batch:
                item = await pipeline.next()
            else:
                item = pipeline.ready()
            if item is None:
                return batch
            if (item.sop_class_uid, item.transfer_syntax_uid) in accepted:
                batch.append(item)
            else:
                pipeline.outliers.append(item)
        return batch


def presentation_contexts(files: Sequence[LocalFile], common: bool = False) -> list[Pair]:
    """One context per (SOP class, transfer syntax) pair among ``files``, so each file goes as stored.

    With ``common``, also the common storage classes in the files' syntaxes and the little endian ones.
    """
    pairs = [(item.sop_class_uid, item.transfer_syntax_uid) for item in files]
    if common:
        syntaxes = [*dict.fromkeys(syntax for _, syntax in pairs), *LITTLE_ENDIAN]
        pairs += [(sop_class, syntax) for sop_class in COMMON_STORAGE_CLASSES for syntax in syntaxes]
    return list(dict.fromkeys(pairs))[:MAX_PRESENTATION_CONTEXTS]


def _worth_resending(result: FileExportResult, unsent: set[str]) -> bool:
    """A failure worth sending again: the file never got through, or the destination was out of resources.

    Every other failure status is the destination's verdict on the file.
    """
    if result.status != "failed":
        return False
    return result.key in unsent or (result.error or "").startswith(OUT_OF_RESOURCES)
