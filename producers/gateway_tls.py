"""TLS for the DICOM gateway: the handshake in the connection's own thread, within a time limit.

pynetdicom's own server does the TLS handshake in its accept loop, on a socket without a timeout: one peer
that connects and says nothing holds every other connection, and shutdown. `TlsAssociationServer` moves it
to the connection's thread (see `wm.pynetdicom_patches` for the reach-ins this needs).
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
from typing import Any

import structlog
from prometheus_client import Counter
from pynetdicom import AE
from pynetdicom.transport import ThreadedAssociationServer
from pynetdicom.utils import make_target

from wm.config import GatewaySettings
from wm.pynetdicom_patches import register_server

__all__ = ["TLS_HANDSHAKES", "TlsAssociationServer", "ssl_context", "start_tls_server"]

log = structlog.get_logger("producers.gateway")

TLS_HANDSHAKES = Counter(
    "mwm_gateway_tls_handshakes_total", "TLS handshakes of accepted connections", ["outcome"]
)


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
    register_server(ae, server)
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


def ssl_context(settings: GatewaySettings) -> ssl.SSLContext | None:
    """A server TLS context when both ``tls_cert`` and ``tls_key`` are set."""
    if not (settings.tls_cert and settings.tls_key):
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(settings.tls_cert, settings.tls_key)
    return context
