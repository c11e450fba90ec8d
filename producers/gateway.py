"""The DICOM gateway: a C-STORE SCP that stores what it receives and announces it on the bus.

``mwm gateway`` listens on one port (``settings.gateway``) and answers every called AE title that is mapped
to an application (see `producers.gateway_admission`: unknown called AE -> association rejected "called AE
not recognised"; a caller not on the AE title's allow-list -> "calling AE not recognised"). It supports
C-ECHO and every storage SOP class in any transfer syntax, caps concurrent associations at
``max_associations``, disables Nagle (TCP_NODELAY) on every accepted socket and speaks TLS when
``tls_cert`` and ``tls_key`` are set. The TLS handshake runs in the connection's own thread, not in the
accept loop as in pynetdicom's server (where one peer that connects and says nothing holds every other
connection, and shutdown), and must end within ``acse_timeout_s``; a peer that fails it or is slower is
closed, logged (``tls_handshake_failed``) and counted (``mwm_gateway_tls_handshakes_total``).

For each C-STORE, in pynetdicom's association thread: the received bytes are taken without decoding them
(preamble, file meta and data set as sent: a valid Part-10 file), the identifiers are read from the header,
then the event loop uploads the file to ``payloads/{payload_id}/{study}/{series}/{sop}.dcm``
(`wm.dicom.object_key`) and publishes ``mwm.payload.arrived`` (source ``dimse``, correlation id = payload
id = one UUID per association). The handler answers success only after both are confirmed. At most
``queue_size`` stores are in flight at once (back-pressure: the sender waits for its response). Failures
answer a DICOM failure status and never success: an unparsable file -> `STATUS.CANNOT_UNDERSTAND`, nothing
stored or published; the object store or the broker unavailable (or slower than ``STORE_TIMEOUT_S``) ->
`STATUS.OUT_OF_RESOURCES`, and the sender may retry. A store whose upload succeeded but whose publish
failed leaves an orphan object under its payload; a retry overwrites it (same key) and re-publishes with
the same message id.

Speed: a sender that waits for each response (dcmtk storescu) gets one file per upload + publish round
trip plus pynetdicom's own receive and response work (``bench/gateway_vs_orthanc.py`` measures both parts
separately); the object store's PUT latency dominates.

A connection must send its A-ASSOCIATE-RQ within ``acse_timeout_s`` (the ARTIM timer, PS3.8 9.1.5; with
TLS counted from the end of the handshake), or the gateway closes it. pynetdicom keeps the thread of a
connection without a request (a port scanner, a TCP probe, even one that has left) that long, and counts it
against ``max_associations``. A connection still in its TLS handshake has a thread of ours; at most
``max_associations`` of them at a time, and one past that is closed as soon as it is accepted, so a flood
of connections that never finish a handshake cannot pile up threads.

SIGTERM: stop accepting connections; close at once those whose peer has not sent its A-ASSOCIATE-RQ (a TCP
probe, a port scanner: they would never carry a study), those in their TLS handshake too; let the
associations that have one finish within ``drain_timeout_s``, abort the rest, exit.
One log line per association: calling and called AE, peer, payload id, files, failures, duration.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import threading
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from enum import IntEnum
from io import BytesIO
from typing import Any

import structlog
from prometheus_client import Counter, Histogram
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer
from pynetdicom.utils import make_target

from producers.gateway_admission import REJECT, AeTitleDirectory, CachedDirectory, Rejection, admit
from producers.publisher import PayloadPublisher
from schemas.events import DicomIdentifiers, FileRef
from wm.adapters.objectstore import ObjectStore
from wm.config import GatewaySettings, Settings
from wm.dicom import InvalidDicom, object_key, read_identifiers
from wm.errors import MwmError
from wm.observability import listen_observability, serve
from wm.registry import Registry
from wm.runtime import Services, health_app, open_services, stop_on_signals

log = structlog.get_logger("producers.gateway")

STORE_TIMEOUT_S = 60.0
"""Longest a C-STORE waits for its upload and publish before answering `STATUS.OUT_OF_RESOURCES`."""
LOOKUP_TIMEOUT_S = 10.0
"""Longest an association request waits for its AE title mapping."""
MAX_PDU_SIZE = 0
"""Maximum PDU length we receive: 0 = unlimited, so senders use large PDUs (far fewer round trips)."""

FILES = Counter("mwm_gateway_files_total", "C-STORE requests answered by the gateway", ["outcome"])
ASSOCIATIONS = Counter("mwm_gateway_associations_total", "Association requests", ["outcome"])
TLS_HANDSHAKES = Counter(
    "mwm_gateway_tls_handshakes_total", "TLS handshakes of accepted connections", ["outcome"]
)
STORE_SECONDS = Histogram(
    "mwm_gateway_store_seconds",
    "Upload plus publish of one received file",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)


class STATUS(IntEnum):
    """The C-STORE response statuses the gateway answers (PS3.4 Annex B.2.3)."""

    SUCCESS = 0x0000
    OUT_OF_RESOURCES = 0xA700
    """Refused: the object store or the broker is unavailable; the sender may retry later."""
    CANNOT_UNDERSTAND = 0xC210
    """Error: the data set cannot be parsed or lacks an identifier; retrying cannot help."""
    PROCESSING_FAILURE = 0x0110
    """Failure: an unexpected error in the gateway (a bug); logged with its traceback."""


@dataclass
class Session:
    """One accepted association: its payload and what happened in it."""

    payload_id: str
    calling_ae_title: str
    called_ae_title: str
    peer: str
    started: float = field(default_factory=time.perf_counter)
    files: int = 0
    failures: int = 0


class Gateway:
    """The C-STORE SCP. ``start`` in the event loop; the pynetdicom threads hand their work back to it."""

    def __init__(
        self,
        settings: GatewaySettings,
        objects: ObjectStore,
        publisher: PayloadPublisher,
        directory: AeTitleDirectory,
        store_timeout_s: float = STORE_TIMEOUT_S,
    ) -> None:
        self.settings = settings
        self._objects = objects
        self._publisher = publisher
        self._directory = directory
        self._store_timeout_s = store_timeout_s
        self._sessions: dict[int, Session] = {}
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._slots: asyncio.Semaphore | None = None
        self.ae = application_entity(settings)
        self._server: Any = None

    @property
    def address(self) -> tuple[str, int]:
        """The bound (host, port); valid after `start`."""
        assert self._server is not None, "gateway not started"
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    async def start(self) -> None:
        """Listen for associations (pynetdicom's server thread) until `stop`."""
        self._loop = asyncio.get_running_loop()
        self._slots = asyncio.Semaphore(self.settings.queue_size)
        address = (self.settings.host, self.settings.port)
        handlers: list[Any] = [
            (evt.EVT_CONN_OPEN, disable_nagle),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_CONN_CLOSE, self._on_conn_close),
        ]
        tls = _ssl_context(self.settings)
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
        host, port = self.address
        log.info("gateway_listening", host=host, port=port, tls=tls is not None)

    async def stop(self, drain_timeout_s: float) -> None:
        """Stop accepting; close connections that sent no association request; drain and abort the others.

        The associations whose peer has sent its A-ASSOCIATE-RQ get up to ``drain_timeout_s`` to finish, then
        are aborted. The others are closed at once and not waited for: their pynetdicom thread may outlive
        `stop` by up to ``acse_timeout_s`` (pynetdicom offers no way to wake it), holding no socket.
        """
        server = self._server
        if server is None:
            return
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
        await asyncio.to_thread(_join_all, draining, drain_timeout_s)
        left = [assoc for assoc in draining if assoc.is_alive()]
        # Not `AE.shutdown()`: it aborts every association thread, and an A-ABORT for a connection still
        # awaiting its request is an invalid event for pynetdicom's state machine (Sta2 + Evt15), which
        # raises in the DUL thread.
        await asyncio.to_thread(_abort_all, left)
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
            self._sessions[id(assoc)] = Session(uuid.uuid4().hex, calling, called, peer)

    def _admission(self, called: str, calling: str, peer: str) -> Rejection | None:
        try:
            mapping = self._run(self._directory.mapping(called), LOOKUP_TIMEOUT_S)
        except (MwmError, FutureTimeout) as exc:
            log.error("ae_title_lookup_failed", called_ae=called, error=str(exc))
            return REJECT.TEMPORARY_CONGESTION
        return admit(mapping, calling, peer)

    def _on_store(self, event: evt.Event) -> int:
        """Store and announce one file; the status says whether both happened."""
        session = self._sessions.get(id(event.assoc))
        if session is None:  # pragma: no cover - pynetdicom only stores on accepted associations
            return int(STATUS.PROCESSING_FAILURE)
        status = self._store_status(session, event.encoded_dataset())
        FILES.labels(status.name.lower()).inc()
        if status is STATUS.SUCCESS:
            session.files += 1
        else:
            session.failures += 1
        return int(status)

    def _store_status(self, session: Session, data: bytes) -> STATUS:
        with structlog.contextvars.bound_contextvars(correlation_id=session.payload_id):
            try:
                ids = read_identifiers(BytesIO(data))
            except InvalidDicom as exc:
                log.warning("store_refused", calling_ae=session.calling_ae_title, reason=str(exc))
                return STATUS.CANNOT_UNDERSTAND
            try:
                self._run(self._store(session, data, ids), self._store_timeout_s)
            except (MwmError, FutureTimeout) as exc:
                log.error("store_failed", sop_uid=ids.sop_instance_uid, error=str(exc) or type(exc).__name__)
                return STATUS.OUT_OF_RESOURCES
            except Exception as exc:
                log.exception("store_bug", sop_uid=ids.sop_instance_uid, error=repr(exc))
                return STATUS.PROCESSING_FAILURE
            return STATUS.SUCCESS

    def _on_conn_close(self, event: evt.Event) -> None:
        """The association's one log line."""
        with self._lock:
            session = self._sessions.pop(id(event.assoc), None)
        if session is None:
            return
        log.info(
            "association_closed",
            correlation_id=session.payload_id,
            calling_ae=session.calling_ae_title,
            called_ae=session.called_ae_title,
            peer=session.peer,
            files=session.files,
            failures=session.failures,
            duration_ms=round((time.perf_counter() - session.started) * 1000, 1),
        )

    # -- event loop side ----------------------------------------------------------------------------------

    def _run(self, coroutine: Any, timeout: float) -> Any:
        """Run ``coroutine`` on the gateway's loop from a pynetdicom thread and wait for its result."""
        assert self._loop is not None
        future = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        try:
            return future.result(timeout=timeout)
        except FutureTimeout:
            future.cancel()
            raise

    async def _store(self, session: Session, data: bytes, ids: DicomIdentifiers) -> FileRef:
        """Upload, then publish; holds one of the ``queue_size`` in-flight slots throughout."""
        assert self._slots is not None
        async with self._slots:
            started = time.perf_counter()
            key = object_key(session.payload_id, ids)
            ref = await self._objects.put_stream(key, BytesIO(data), len(data))
            await self._publisher.file_stored(
                payload_id=session.payload_id,
                file=ref,
                dicom=ids,
                calling_ae_title=session.calling_ae_title,
                called_ae_title=session.called_ae_title,
                source="dimse",
            )
            STORE_SECONDS.observe(time.perf_counter() - started)
            return ref


class TlsAssociationServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with the TLS handshake in the connection's thread, within a time limit.

    pynetdicom's own server does the handshake in its accept loop, on a socket without a timeout: one peer
    that connects and sends nothing (a port scanner, a TCP probe) holds every other connection, and
    `shutdown`, until it leaves. Here the loop only accepts; the connection's thread does the handshake within
    ``handshake_timeout_s`` (for the whole handshake), then hands the TLS socket to pynetdicom as its own
    server would. A peer that fails or does not finish its handshake is closed and logged. At most
    ``max_handshakes`` connections are in their handshake at a time; the accept loop closes one more at once.
    ``server_close`` (part of `shutdown`) closes the connections still in their handshake.
    """

    def __init__(self, *args: Any, handshake_timeout_s: float, max_handshakes: int, **kwargs: Any) -> None:
        self._handshake_timeout_s = handshake_timeout_s
        self._max_handshakes = max_handshakes
        self._pending_handshakes = 0  # accepted, handshake not over: from the accept loop to the thread's end
        self._handshakes: set[ssl.SSLSocket] = set()
        self._handshakes_lock = threading.Lock()
        self._closing = False
        self.closed_handshakes = 0
        """Connections `server_close` closed during their handshake."""
        super().__init__(*args, **kwargs)

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        """Accept a connection without reading from it (pynetdicom's would do the handshake here)."""
        assert self.socket is not None
        client, address = self.socket.accept()
        return client, address

    def verify_request(
        self, request: socket.socket | tuple[bytes, socket.socket], client_address: tuple[str, int] | str
    ) -> bool:
        """In the accept loop, before a thread is started: refuse a connection past ``max_handshakes``."""
        with self._handshakes_lock:
            in_progress = self._pending_handshakes
            if in_progress < self._max_handshakes:
                self._pending_handshakes += 1
                return True
        TLS_HANDSHAKES.labels("refused").inc()
        log.warning("tls_handshake_refused", peer=_host(client_address), in_progress=in_progress)
        return False  # the server closes the socket

    def process_request(
        self, request: socket.socket | tuple[bytes, socket.socket], client_address: tuple[str, int] | str
    ) -> None:
        try:
            super().process_request(request, client_address)
        except BaseException:  # no thread was started to end this handshake
            self._handshake_over()
            raise

    def process_request_thread(
        self, request: socket.socket | tuple[bytes, socket.socket], client_address: tuple[str, int] | str
    ) -> None:
        """In the connection's thread: the handshake, then pynetdicom's association as usual."""
        assert isinstance(request, socket.socket), "a stream server's request is its socket"
        try:
            connection = self._handshake(request, _host(client_address))
        finally:
            self._handshake_over()
        if connection is not None:
            super().process_request_thread(connection, client_address)

    def _handshake_over(self) -> None:
        with self._handshakes_lock:
            self._pending_handshakes -= 1

    def _handshake(self, raw: socket.socket, peer: str) -> ssl.SSLSocket | None:
        assert self.ssl_context is not None
        try:
            # No handshake in wrap_socket: `server_close` must be able to reach the socket during it.
            connection = self.ssl_context.wrap_socket(raw, server_side=True, do_handshake_on_connect=False)
        except OSError as exc:
            _handshake_failed(raw, peer, "failed", exc)
            return None
        with self._handshakes_lock:
            if self._closing:  # accepted just before `shutdown` stopped the accept loop
                _close(connection)
                return None
            self._handshakes.add(connection)
        failure: OSError | None = None
        try:
            connection.settimeout(self._handshake_timeout_s)  # a deadline for the whole handshake
            connection.do_handshake()
            connection.settimeout(None)  # as pynetdicom's own server leaves its sockets
        except OSError as exc:  # ssl.SSLError, TimeoutError, a peer that left
            failure = exc
        with self._handshakes_lock:
            self._handshakes.discard(connection)
            closing = self._closing
        if failure is None and not closing:
            TLS_HANDSHAKES.labels("completed").inc()
            return connection
        if closing:
            _close(connection)
        else:
            assert failure is not None
            _handshake_failed(
                connection, peer, "timeout" if isinstance(failure, TimeoutError) else "failed", failure
            )
        return None

    def server_close(self) -> None:
        """Close the listening socket and the connections in their handshake, then wait for their threads."""
        with self._handshakes_lock:
            self._closing = True
            for connection in self._handshakes:
                # The plain socket's shutdown, not SSLSocket.shutdown: that one drops the SSL object the
                # handshake thread is using. Under the lock, so the thread cannot have closed the descriptor.
                with contextlib.suppress(OSError):
                    socket.socket.shutdown(connection, socket.SHUT_RDWR)
            self.closed_handshakes += len(self._handshakes)
        super().server_close()


def start_tls_server(
    ae: AE,
    address: tuple[str, int],
    context: ssl.SSLContext,
    handlers: list[Any],
    handshake_timeout_s: float,
    max_handshakes: int,
) -> TlsAssociationServer:
    """`AE.start_server(block=False)` with a `TlsAssociationServer` (start_server takes no server class)."""
    server = ae.make_server(
        address,
        ssl_context=context,
        evt_handlers=handlers,
        server_class=TlsAssociationServer,
        handshake_timeout_s=handshake_timeout_s,
        max_handshakes=max_handshakes,
    )
    assert isinstance(server, TlsAssociationServer)
    thread = threading.Thread(target=make_target(server.serve_forever), name="AcceptorServer", daemon=True)
    thread.start()
    # As start_server does: `AssociationServer.shutdown` removes the server from this list.
    ae._servers.append(server)
    return server


def _host(client_address: tuple[str, int] | str) -> str:
    """The peer's host alone, as the association log lines name it."""
    return str(client_address[0]) if isinstance(client_address, tuple) else client_address


def _handshake_failed(connection: socket.socket, peer: str, outcome: str, failure: OSError) -> None:
    TLS_HANDSHAKES.labels(outcome).inc()
    log.warning(
        "tls_handshake_failed", peer=peer, outcome=outcome, reason=str(failure) or type(failure).__name__
    )
    _close(connection)


def _close(connection: socket.socket) -> None:
    with contextlib.suppress(OSError):
        connection.close()


def _join_all(threads: list[threading.Thread], timeout_s: float) -> None:
    """Wait for ``threads`` to end, ``timeout_s`` seconds at most in all."""
    deadline = time.monotonic() + timeout_s
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))


def _abort_all(associations: list[Association]) -> None:
    for assoc in associations:
        assoc.abort()


def has_requested(assoc: Association) -> bool:
    """Whether the peer of an accepted connection has sent its A-ASSOCIATE-RQ.

    Sta3 is the DUL holding the request for the association thread (PS3.8 9.2); once that thread takes it,
    ``requestor.primitive`` is set. Before the request the DUL is in Sta1 (starting, or the peer left) or
    Sta2 (waiting, ARTIM running); Sta13 without a request is a request the DUL itself refused.
    """
    return assoc.dul.state_machine.current_state == "Sta3" or assoc.requestor.primitive is not None


def close_connection(assoc: Association) -> None:
    """Shut down the connection under ``assoc``; its DUL thread then sees the peer gone and ends it.

    A shutdown rather than a close: the DUL thread polls and reads the socket, and a descriptor closed under
    another thread can be reused by a new one; the DUL closes it when it sees the end of the stream.
    """
    connection = assoc.dul.socket
    sock = connection.socket if connection is not None else None
    if sock is not None:
        with contextlib.suppress(OSError):  # already closed, by the peer or by the DUL
            sock.shutdown(socket.SHUT_RDWR)


def disable_nagle(event: evt.Event) -> None:
    """EVT_CONN_OPEN: set TCP_NODELAY, or every C-STORE response waits on a 40 ms delayed ACK."""
    connection = event.assoc.dul.socket
    if connection is not None and connection.socket is not None:
        connection.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def application_entity(settings: GatewaySettings) -> AE:
    """An AE accepting C-ECHO and every storage SOP class, in every transfer syntax (stored as sent)."""
    ae = AE()
    ae.maximum_associations = settings.max_associations
    ae.acse_timeout = settings.acse_timeout_s
    ae.maximum_pdu_size = MAX_PDU_SIZE
    ae.add_supported_context(Verification)
    for context in AllStoragePresentationContexts:
        assert context.abstract_syntax is not None
        ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
    return ae


def _ssl_context(settings: GatewaySettings) -> ssl.SSLContext | None:
    """A server TLS context when both ``tls_cert`` and ``tls_key`` are set."""
    if not (settings.tls_cert and settings.tls_key):
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(settings.tls_cert, settings.tls_key)
    return context


@contextlib.asynccontextmanager
async def serving(settings: Settings) -> AsyncIterator[tuple[Gateway, Services]]:
    """The gateway listening, with its services; on exit it drains (``drain_timeout_s``) and closes."""
    async with open_services(settings) as services:
        directory = CachedDirectory(Registry(services.database))
        gateway = Gateway(settings.gateway, services.objects, PayloadPublisher.over(services.bus), directory)
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
