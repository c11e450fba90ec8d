"""The DICOM gateway: a C-STORE SCP that spools what it receives, then uploads and announces it.

``mwm gateway`` listens on one port (``settings.gateway``) and answers every called AE title that is mapped
to an application (`producers.gateway_admission`: unknown called AE -> association rejected "called AE not
recognised"; a caller not on the AE title's allow-list -> "calling AE not recognised"). It supports C-ECHO
and every storage SOP class in any transfer syntax, caps concurrent associations at ``max_associations``,
disables Nagle (TCP_NODELAY) on every accepted socket and speaks TLS when ``tls_cert`` and ``tls_key`` are
set (`producers.gateway_tls`: the handshake in the connection's own thread, within ``acse_timeout_s``).

Store and forward. Each C-STORE's data set is streamed to a slot file on the spool volume as its PDUs arrive
(pynetdicom's chunked receive, `wm.pynetdicom_patches.receive_into`), never held whole in memory. In the
association thread the handler then checks the file with one walk of its element headers
(`wm.dicom_encoding.inspect_file`: every element ends within the received bytes, and the raw values of the
identifiers MWM needs, `wm.dicom.identifiers_from_raw`), makes it durable where it was received (a
reusable slot of the spool, `producers.gateway_spool`), and only then answers success. The object store and
the broker are not on the modality's path: the uploader (`producers.gateway_uploader`) uploads to
``payloads/{payload_id}/{study}/{series}/{sop}.dcm`` and publishes ``mwm.payload.arrived`` (source
``dimse``, correlation id = payload id = one UUID per association) in the background, announcing an
association's files once it ended well (aborted associations wait ``abort_grace_s`` for a retry), and
resumes what the spool holds at start.

Every failure status carries an Error Comment (0000,0902) saying why:

- `STATUS.OUT_OF_RESOURCES` (0xA700): the spool is at ``spool_max_bytes`` (logged ``spool_full``) or cannot
  be written; the sender retries later. Nothing already accepted is touched.
- `STATUS.CANNOT_UNDERSTAND` (0xC210): the data set's encoding is incomplete (truncated pixel data), it
  cannot be parsed or lacks an identifier; nothing stored or published.
- `STATUS.PROCESSING_FAILURE` (0x0110): an unexpected error in the gateway (a bug), logged with its traceback.

A connection must send its A-ASSOCIATE-RQ within ``acse_timeout_s`` (the ARTIM timer, PS3.8 9.1.5; with
TLS counted from the end of the handshake), or the gateway closes it.

SIGTERM: stop accepting connections; close at once those whose peer has not sent its A-ASSOCIATE-RQ (a TCP
probe, a port scanner: they would never carry a study), those in their TLS handshake too; let the
associations that have one finish within ``drain_timeout_s``, abort the rest (their files are held in the
spool like any aborted association's), stop the uploader (the spool keeps what it did not finish), exit.
One log line per association: calling and called AE, peer, payload id, files, failures, duration.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path
from typing import Any

import structlog
from prometheus_client import Counter
from pydicom.dataset import Dataset
from pynetdicom import evt
from pynetdicom.pdu import A_RELEASE_RQ

from producers.gateway_admission import REJECT, AeTitleDirectory, CachedDirectory, Rejection, admit
from producers.gateway_ae import abort_all, application_entity, close_connection, disable_nagle, join_all
from producers.gateway_slots import SlotWriter, open_slot
from producers.gateway_spool import SessionInfo, Spool
from producers.gateway_tls import TlsAssociationServer, ssl_context, start_tls_server
from producers.gateway_uploader import Uploader
from producers.publisher import PayloadPublisher
from wm.adapters.objectstore import ObjectStore
from wm.config import GatewaySettings, Settings
from wm.dicom import IDENTIFIER_TAGS, InvalidDicom, identifiers_from_raw, read_identifiers
from wm.dicom_encoding import inspect_file
from wm.errors import MwmError
from wm.observability import cannot_listen, listen_observability, serve, stop_on_signals
from wm.pynetdicom_patches import copy_contexts_cheaply, has_requested, receive_into, received_file
from wm.registry import Registry
from wm.runtime import Services, health_app, open_services

log = structlog.get_logger("producers.gateway")

ERROR_COMMENT_LENGTH = 64
"""Error Comment (0000,0902) is LO: 64 characters at most."""

FILES = Counter("mwm_gateway_files_total", "C-STORE requests answered by the gateway", ["outcome"])
ASSOCIATIONS = Counter("mwm_gateway_associations_total", "Association requests", ["outcome"])


class STATUS(IntEnum):
    """The C-STORE response statuses the gateway answers (PS3.4 Annex B.2.3)."""

    SUCCESS = 0x0000
    OUT_OF_RESOURCES = 0xA700
    """Refused: the spool is full or cannot be written; the sender may retry later."""
    CANNOT_UNDERSTAND = 0xC210
    """Error: the data set is incomplete, cannot be parsed or lacks an identifier; retrying cannot help."""
    PROCESSING_FAILURE = 0x0110
    """Failure: an unexpected error in the gateway (a bug); logged with its traceback."""


@dataclass
class Session:
    """One accepted association: its spool record and what happened in it."""

    info: SessionInfo
    started: float = field(default_factory=time.perf_counter)
    files: int = 0
    failures: int = 0
    released: bool = False
    saved: bool = False
    """Whether its spool record is written (at its first accepted file)."""


class Gateway:
    """The C-STORE SCP. ``start`` in the event loop; pynetdicom's threads hand their files to the uploader."""

    def __init__(
        self,
        settings: GatewaySettings,
        spool_dir: Path,
        objects: ObjectStore,
        publisher: PayloadPublisher,
        directory: AeTitleDirectory,
    ) -> None:
        self.settings = settings
        self.spool = Spool(spool_dir, settings.spool_max_bytes)
        self.uploader = Uploader(
            self.spool, objects, publisher, settings.upload_workers, settings.abort_grace_s
        )
        self._directory = directory
        self._sessions: dict[int, Session] = {}
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.ae = application_entity(settings)
        self._server: Any = None

    @property
    def address(self) -> tuple[str, int]:
        """The bound (host, port); valid after `start`."""
        assert self._server is not None, "gateway not started"
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    async def start(self) -> None:
        """Resume the spool's uploads, then listen (pynetdicom's server thread) until `stop`."""
        self._loop = asyncio.get_running_loop()
        receive_into(self.spool.receiver)
        await self.uploader.start()
        preallocate = self.settings.spool_preallocated_files
        written = await asyncio.to_thread(self.spool.slots.preallocate, preallocate)
        address = (self.settings.host, self.settings.port)
        handlers: list[Any] = [
            (evt.EVT_CONN_OPEN, disable_nagle),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_PDU_RECV, self._on_pdu),
            (evt.EVT_CONN_CLOSE, self._on_conn_close),
        ]
        tls = ssl_context(self.settings)
        try:
            if tls is None:
                self._server = self.ae.start_server(address, block=False, evt_handlers=handlers)
            else:
                self._server = start_tls_server(
                    self.ae,
                    address,
                    tls,
                    handlers,
                    handshake_timeout_s=self.settings.acse_timeout_s,
                    max_handshakes=self.settings.max_associations,
                )
        except OSError as exc:
            raise cannot_listen("MWM_GATEWAY__PORT", *address, exc) from exc
        copy_contexts_cheaply(self._server)
        host, port = self.address
        log.info(
            "gateway_listening",
            host=host,
            port=port,
            tls=tls is not None,
            spool=str(self.spool.directory),
            spool_slots=self.spool.slots.count,
            spool_slots_written=written,
        )

    async def stop(self, drain_timeout_s: float) -> None:
        """Stop accepting; close connections that sent no association request; drain and abort the others.

        The associations whose peer has sent its A-ASSOCIATE-RQ get up to ``drain_timeout_s`` to finish, then
        are aborted. The others are closed at once and not waited for: their pynetdicom thread may outlive
        `stop` by up to ``acse_timeout_s`` (pynetdicom offers no way to wake it), holding no socket.
        """
        server = self._server
        if server is None:
            return
        await self._stop_listening(server, drain_timeout_s)
        await self.uploader.stop()

    async def _stop_listening(self, server: Any, drain_timeout_s: float) -> None:
        # A TLS server also closes here the connections still in their TLS handshake (`TlsAssociationServer`).
        await asyncio.to_thread(server.shutdown)
        # No await between sorting and closing: an association's admission runs on this loop, so none can
        # become established meanwhile. A request read while we look is refused by the close, before any
        # A-ASSOCIATE-AC; its sender sees a failed association (as if it came after the shutdown) and retries.
        draining, silent = [], []
        for assoc in server.active_associations:
            if has_requested(assoc):
                draining.append(assoc)
            else:
                close_connection(assoc)
                silent.append(assoc)
        await asyncio.to_thread(join_all, draining, drain_timeout_s)
        left = [assoc for assoc in draining if assoc.is_alive()]
        # Not `AE.shutdown()`: it aborts every association thread, and an A-ABORT for a connection still
        # awaiting its request is an invalid event for pynetdicom's state machine (Sta2 + Evt15), which
        # raises in the DUL thread.
        await asyncio.to_thread(abort_all, left)
        self._server = None
        closed_handshakes = server.closed_handshakes if isinstance(server, TlsAssociationServer) else 0
        log.info(
            "gateway_stopped",
            aborted_associations=len(left),
            closed_silent_connections=len(silent) + closed_handshakes,
        )

    # -- pynetdicom handlers (association threads) --------------------------------------------------------

    def _on_requested(self, event: evt.Event) -> None:
        """Accept or reject the association by its called and calling AE titles."""
        assoc = event.assoc
        request = assoc.requestor.primitive
        assert request is not None, "EVT_REQUESTED always carries the A-ASSOCIATE request"
        called, calling = request.called_ae_title.strip(), request.calling_ae_title.strip()
        peer = str(assoc.requestor.address)
        rejection = self._admission(called, calling, peer)
        if rejection is not None:
            ASSOCIATIONS.labels("rejected").inc()
            log.warning(
                "association_rejected",
                calling_ae=calling,
                called_ae=called,
                peer=peer,
                reason=rejection.reason,
            )
            assoc.acse.send_reject(rejection.result, rejection.source, rejection.diagnostic)
            assoc.kill()
            return
        ASSOCIATIONS.labels("accepted").inc()
        with self._lock:
            self._sessions[id(assoc)] = Session(SessionInfo(uuid.uuid4().hex, calling, called, peer))

    def _admission(self, called: str, calling: str, peer: str) -> Rejection | None:
        assert self._loop is not None
        future = asyncio.run_coroutine_threadsafe(self._directory.mapping(called), self._loop)
        try:
            mapping = future.result(timeout=self.settings.lookup_timeout_s)
        except (MwmError, FutureTimeout) as exc:
            future.cancel()
            log.error("ae_title_lookup_failed", called_ae=called, error=str(exc))
            return REJECT.TEMPORARY_CONGESTION
        return admit(mapping, calling, peer)

    def _on_store(self, event: evt.Event) -> Dataset:
        """Spool one file; the status says whether it is durable (and why not, in its Error Comment)."""
        session = self._sessions.get(id(event.assoc))
        if session is None:  # pragma: no cover - pynetdicom only stores on accepted associations
            return response(STATUS.PROCESSING_FAILURE, "association unknown to the gateway")
        with structlog.contextvars.bound_contextvars(correlation_id=session.info.payload_id):
            try:
                status, comment = self._spool_file(session, received_file(event))
            except Exception as exc:
                log.exception("store_bug", error=repr(exc))
                status, comment = STATUS.PROCESSING_FAILURE, f"gateway error: {type(exc).__name__}"
        FILES.labels(status.name.lower()).inc()
        if status is STATUS.SUCCESS:
            session.files += 1
        else:
            session.failures += 1
        return response(status, comment)

    def _spool_file(self, session: Session, received: SlotWriter) -> tuple[STATUS, str]:
        calling = session.info.calling_ae_title
        if self.spool.full():
            log.error(
                "spool_full",
                calling_ae=calling,
                spool_bytes=self.spool.bytes,
                limit_bytes=self.spool.max_bytes,
                action="C-STORE refused with 0xA700; the sender should retry later",
            )
            return STATUS.OUT_OF_RESOURCES, "gateway spool full, retry later"
        # One walk of the element headers: the integrity check and the identifiers' raw values.
        inspection = inspect_file(received.path, IDENTIFIER_TAGS, size=received.length)
        if inspection.problem is not None:
            problem = inspection.problem
            log.warning("store_refused", calling_ae=calling, reason=f"incomplete encoding: {problem}")
            return STATUS.CANNOT_UNDERSTAND, f"incomplete data set: {problem}"
        try:
            if inspection.walked:
                ids = identifiers_from_raw(inspection.values)
            else:  # a deflated data set: pydicom reads it
                with open_slot(received.path, received.length) as stream:
                    ids = read_identifiers(stream)
        except InvalidDicom as exc:
            log.warning("store_refused", calling_ae=calling, reason=str(exc))
            return STATUS.CANNOT_UNDERSTAND, str(exc)
        try:
            if not session.saved:
                self.spool.save_session(session.info)
                session.saved = True
            item = self.spool.accept(received, session.info, ids)
        except OSError as exc:
            log.error("spool_write_failed", sop_uid=ids.sop_instance_uid, error=str(exc))
            return STATUS.OUT_OF_RESOURCES, f"cannot write the gateway spool: {exc.strerror or exc}"
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self.uploader.add, item)
        return STATUS.SUCCESS, ""

    def _on_pdu(self, event: evt.Event) -> None:
        """The peer asked to release the association: it ended well, once its connection closes.

        Seen as the DUL thread reads the A-RELEASE-RQ, so before that thread reports the connection closed;
        ``EVT_RELEASED`` comes from the association thread once it has answered, and the peer may close the
        connection (and the DUL thread report it) first.
        """
        if isinstance(event.pdu, A_RELEASE_RQ):
            session = self._sessions.get(id(event.assoc))
            if session is not None:
                session.released = True

    def _on_conn_close(self, event: evt.Event) -> None:
        """Hand the association's end to the uploader; the association's one log line."""
        with self._lock:
            session = self._sessions.pop(id(event.assoc), None)
        if session is None:
            return
        info = session.info
        if session.saved:
            info.state, info.ended_at = ("complete" if session.released else "aborted"), time.time()
            try:
                self.spool.save_session(info)
            except OSError as exc:  # the files are safe; a restart treats the session as aborted
                log.error("spool_write_failed", correlation_id=info.payload_id, error=str(exc))
            assert self._loop is not None
            self._loop.call_soon_threadsafe(self.uploader.ended, info)
        log.info(
            "association_closed",
            correlation_id=info.payload_id,
            calling_ae=info.calling_ae_title,
            called_ae=info.called_ae_title,
            peer=info.peer,
            files=session.files,
            failures=session.failures,
            released=session.released,
            duration_ms=round((time.perf_counter() - session.started) * 1000, 1),
        )


def response(status: STATUS, comment: str) -> Dataset:
    """A C-STORE response status; a failure carries ``comment`` as its Error Comment."""
    dataset = Dataset()
    dataset.Status = int(status)
    if status is not STATUS.SUCCESS:
        dataset.ErrorComment = comment[:ERROR_COMMENT_LENGTH]
    return dataset


def spool_directory(settings: Settings) -> Path:
    """``gateway.spool_dir``, or ``<work_dir>/spool`` when it is empty."""
    return Path(settings.gateway.spool_dir or Path(settings.work_dir) / "spool")


@contextlib.asynccontextmanager
async def serving(settings: Settings) -> AsyncIterator[tuple[Gateway, Services]]:
    """The gateway listening, with its services; on exit it drains (``drain_timeout_s``) and closes."""
    async with open_services(settings) as services:
        directory = CachedDirectory(Registry(services.database))
        gateway = Gateway(
            settings.gateway,
            spool_directory(settings),
            services.objects,
            PayloadPublisher.over(services.bus),
            directory,
        )
        await gateway.start()
        try:
            yield gateway, services
        finally:
            await gateway.stop(settings.observability.drain_timeout_s)


async def run_gateway(settings: Settings, stop: asyncio.Event | None = None) -> None:
    """Run the gateway (and /healthz, /readyz, /metrics) until SIGTERM/SIGINT or ``stop``, then drain."""
    stop = stop or stop_on_signals()
    observability = settings.observability
    listener = listen_observability(observability)  # before connecting: a port in use fails at once
    async with serving(settings) as (_, services), asyncio.TaskGroup() as tasks:
        if listener is not None:
            tasks.create_task(serve(health_app(services), listener, stop))
        await stop.wait()
        log.info("draining", timeout_s=observability.drain_timeout_s)
