"""The gateway's uploader: spooled files to the object store, then ``mwm.payload.arrived``, then deleted.

It runs on the gateway's event loop, off the modality's path: a C-STORE is answered once its file is in the
spool (`producers.gateway_spool`). ``gateway.upload_workers`` uploads run at a time (bounded parallelism);
an upload or publish that fails (object store or broker down) is counted
(``mwm_gateway_upload_failures_total``) and retried after a backoff that every worker shares, so once the
service is back the whole backlog flows at once instead of trickling out of staggered timers.
While an association is receiving, uploads wait (at most `UPLOAD_DEFER_S` after a file was spooled): the
receive and the uploads share one GIL, and the modality's time is what the gateway answers for.

Complete studies: a file is announced only once its association has *ended well* (A-RELEASE). The files of
an association that was aborted (A-ABORT, the connection lost, the gateway killed) are uploaded but held
for ``gateway.abort_grace_s``, waiting for the sender's retry:

- a file that arrives again (same study and SOP Instance UID, any association) replaces the held copy,
  which is dropped;
- when a later association carrying one of the held study's instances ends well, the held files left (those
  the retry did not resend) are announced with it;
- with no retry, the held files are announced at the end of the grace period, marked ``interrupted``, so the
  job record says the study may be incomplete; a retry still receiving the same study as the grace period
  ends is waited for (up to one more grace period).

A file is deleted from the spool only after its upload and its announcement were both confirmed. After a
crash the spool is uploaded again from the start: the object key and the message id are the same, so an
upload overwrites and a re-announcement is a duplicate that MWM's consumers drop.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import structlog
from prometheus_client import Counter, Gauge

from producers.gateway_spool import SessionInfo, Spool, SpooledFile
from producers.publisher import PayloadPublisher
from schemas.events import FileRef
from wm.adapters.objectstore import ObjectStore
from wm.dicom import object_key
from wm.errors import MwmError
from wm.service_layer.periodic import every

__all__ = ["Uploader"]

log = structlog.get_logger("producers.gateway")

UPLOAD_FAILURES = Counter("mwm_gateway_upload_failures_total", "Failed uploads or announcements", ["stage"])
SPOOL_BYTES = Gauge("mwm_gateway_spool_bytes", "Bytes of accepted files not yet uploaded and announced")
SPOOL_FILES = Gauge("mwm_gateway_spool_files", "Accepted files not yet uploaded and announced")
SPOOL_OLDEST = Gauge("mwm_gateway_spool_oldest_age_seconds", "Age of the oldest file in the spool")
BACKOFF_S = (0.1, 2.0)
"""First and largest shared backoff after a failed upload or announcement."""
UPLOAD_DEFER_S = 10.0
"""While an association is receiving, a file's upload waits up to this long after it was spooled."""


@dataclass
class Batch:
    """The files of one association on their way out."""

    session: SessionInfo
    files: dict[tuple[str, str], SpooledFile] = field(default_factory=dict)
    """(study, SOP instance) -> the file (a later copy replaces an earlier one)."""
    uploaded: dict[tuple[str, str], FileRef] = field(default_factory=dict)
    interrupted: bool = False
    announcing: bool = False


class Uploader:
    """Moves spooled files to the object store and announces them (see the module docstring)."""

    def __init__(
        self,
        spool: Spool,
        objects: ObjectStore,
        publisher: PayloadPublisher,
        workers: int,
        abort_grace_s: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._spool = spool
        self._objects = objects
        self._publisher = publisher
        self._workers = workers
        self._grace_s = abort_grace_s
        self._clock = clock
        self._batches: dict[str, Batch] = {}
        self._uploads: asyncio.Queue[SpooledFile] = asyncio.Queue()
        self._announce: asyncio.Queue[tuple[Batch, tuple[str, str]]] = asyncio.Queue()
        self._resume_at = 0.0
        self._delay_s = BACKOFF_S[0]
        self._tasks: list[asyncio.Task[None]] = []
        self._receiving: set[str] = set()
        """Payload ids of the associations still receiving files."""
        self._quiet = asyncio.Event()
        self._quiet.set()
        SPOOL_BYTES.set_function(lambda: spool.bytes)
        SPOOL_FILES.set_function(lambda: spool.files)
        SPOOL_OLDEST.set_function(spool.oldest_age_s)

    async def start(self) -> None:
        """Resume what the spool holds, then run the workers until `stop`."""
        recovered = await asyncio.to_thread(self._spool.recover)
        for item in recovered:
            self.add(item)
        sessions = {item.session.payload_id: item.session for item in recovered}
        for session in sessions.values():
            self.ended(session)
        if recovered:
            log.info("spool_resumed", files=len(recovered), associations=len(sessions))
        self._tasks = [asyncio.create_task(self._upload_worker()) for _ in range(self._workers)]
        self._tasks.append(asyncio.create_task(self._announcer()))
        self._tasks.append(asyncio.create_task(self._grace_timer()))

    async def stop(self) -> None:
        """Stop the workers; what is not announced stays in the spool for the next start."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # -- from the association threads, through the loop ---------------------------------------------------

    def add(self, item: SpooledFile) -> None:
        """Take an accepted file: it supersedes any held copy of the same instance, then is uploaded."""
        key = (item.ids.study_instance_uid, item.ids.sop_instance_uid)
        for other in list(self._batches.values()):
            if other.session.state == "aborted" and other.session is not item.session:
                held = other.files.pop(key, None)
                if held is not None:
                    other.uploaded.pop(key, None)
                    self._spool.remove(held)
                    log.debug(
                        "held_file_superseded", sop_uid=key[1], held_payload_id=other.session.payload_id
                    )
        if item.session.state == "open":
            self._receiving.add(item.session.payload_id)
            self._quiet.clear()
        batch = self._batches.setdefault(item.session.payload_id, Batch(item.session))
        replaced = batch.files.get(key)
        batch.files[key] = item
        if replaced is not None:
            self._spool.remove(replaced)
        self._uploads.put_nowait(item)

    def ended(self, session: SessionInfo) -> None:
        """The association ended (its state is set): announce its files, or hold them for a retry."""
        self._receiving.discard(session.payload_id)
        if not self._receiving:
            self._quiet.set()
        batch = self._batches.get(session.payload_id)
        if batch is None:
            return
        if session.state == "complete":
            studies = {study for study, _ in batch.files}
            for other in list(self._batches.values()):  # the retry came: release what it did not resend
                if other.session.state == "aborted" and (
                    not other.files or any(study in studies for study, _ in other.files)
                ):
                    log.info(
                        "held_files_released_with_retry",
                        correlation_id=other.session.payload_id,
                        retry=session.payload_id,
                        not_resent=len(other.files),
                    )
                    self._release(other, interrupted=False)
            self._release(batch, interrupted=False)
        else:
            log.warning(
                "association_files_held",
                correlation_id=session.payload_id,
                files=len(batch.files),
                grace_s=self._grace_s,
            )

    # -- the event loop -----------------------------------------------------------------------------------

    def _release(self, batch: Batch, interrupted: bool) -> None:
        batch.session.state, batch.interrupted = "complete", interrupted
        self._announce_if_uploaded(batch)
        self._forget_if_done(batch)

    def _announce_if_uploaded(self, batch: Batch) -> None:
        """Announce a released batch once every file of it is uploaded: discovery gets the association's
        files as one burst, not spread over the uploads (which a short quiet period could split)."""
        if (
            batch.session.state == "complete"
            and not batch.announcing
            and len(batch.uploaded) == len(batch.files)
        ):
            batch.announcing = True
            for key in list(batch.uploaded):
                self._announce.put_nowait((batch, key))

    async def _grace_timer(self) -> None:
        interval_s = min(1.0, max(0.05, self._grace_s / 4))
        # Never stopped: cancelled with the uploader's other tasks.
        await every(interval_s, asyncio.Event(), self._release_held, "grace_timer", wait_first=True)

    async def _release_held(self) -> None:
        now = self._clock()
        for batch in list(self._batches.values()):
            ended = batch.session.ended_at
            if batch.session.state == "aborted" and ended is not None and now - ended >= self._grace_s:
                if now - ended < 2 * self._grace_s and self._retry_receiving(batch):
                    continue
                log.warning(
                    "held_files_released_without_retry",
                    correlation_id=batch.session.payload_id,
                    files=len(batch.files),
                )
                self._release(batch, interrupted=True)

    def _retry_receiving(self, held: Batch) -> bool:
        """Whether an association is receiving one of the held files' studies now (a retry in progress).

        The grace period then waits for its end (at most one more grace period): ended well, it releases
        the held files with it; aborted, they are released as interrupted. Matched by study, not by calling
        AE title, so a modality that keeps sending other studies cannot hold them back.
        """
        studies = {study for study, _ in held.files}
        return any(
            other.session.state == "open" and any(study in studies for study, _ in other.files)
            for other in self._batches.values()
        )

    async def _upload_worker(self) -> None:
        while True:
            item = await self._uploads.get()
            await self._defer_while_receiving(item)
            key = (item.ids.study_instance_uid, item.ids.sop_instance_uid)
            ref = await self._retrying("upload", self._upload, item)
            batch = self._batches.get(item.session.payload_id)
            if batch is None or batch.files.get(key) is not item:
                continue  # superseded while it was uploading
            batch.uploaded[key] = ref
            self._announce_if_uploaded(batch)

    async def _defer_while_receiving(self, item: SpooledFile) -> None:
        """Let the associations receive first, for up to `UPLOAD_DEFER_S` after ``item`` was spooled.

        Receiving and uploading share one GIL: measured here, uploads running during a 324-slice study
        doubled the modality's time, more than uploading after it costs the announcements (which wait for
        the association's end anyway). The bound keeps a stream of associations from starving the uploads.
        """
        left = item.spooled_at + UPLOAD_DEFER_S - self._clock()
        if left > 0 and not self._quiet.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._quiet.wait(), left)

    async def _upload(self, item: SpooledFile) -> FileRef:
        key = object_key(item.session.payload_id, item.ids)
        with self._spool.open(item) as stream:
            return await self._objects.put_stream(key, stream, item.size)

    async def _announcer(self) -> None:
        while True:
            batch, key = await self._announce.get()
            item, ref = batch.files.get(key), batch.uploaded.get(key)
            if item is None or ref is None:
                continue
            await self._retrying("publish", self._publish, batch, item, ref)
            batch.files.pop(key, None)
            batch.uploaded.pop(key, None)
            await asyncio.to_thread(self._spool.remove, item)
            self._forget_if_done(batch)

    async def _publish(self, batch: Batch, item: SpooledFile, ref: FileRef) -> str:
        session = batch.session
        return await self._publisher.file_stored(
            payload_id=session.payload_id,
            file=ref,
            dicom=item.ids,
            calling_ae_title=session.calling_ae_title,
            called_ae_title=session.called_ae_title,
            source="dimse",
            interrupted=batch.interrupted,
        )

    def _forget_if_done(self, batch: Batch) -> None:
        if not batch.files and batch.session.state == "complete":
            self._batches.pop(batch.session.payload_id, None)
            self._spool.remove_session(batch.session.payload_id)

    async def _retrying(self, stage: str, call: Callable[..., Any], *args: Any) -> Any:
        """``call(*args)`` until it succeeds, behind the backoff all workers share."""
        while True:
            wait = self._resume_at - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            try:
                result = await call(*args)
            except MwmError as exc:
                UPLOAD_FAILURES.labels(stage).inc()
                log.warning("spool_forward_failed", stage=stage, error=str(exc) or type(exc).__name__)
                self._resume_at = max(self._resume_at, time.monotonic() + self._delay_s)
                self._delay_s = min(self._delay_s * 2, BACKOFF_S[1])
                continue
            self._delay_s = BACKOFF_S[0]
            return result
