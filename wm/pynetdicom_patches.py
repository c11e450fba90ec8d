"""Every place MWM works around pynetdicom or reaches into its internals, in one module.

Each item names what it relies on, why it exists and its upstream reference. They were written for, and
tested with, the versions in `SUPPORTED` (the pin in ``pyproject.toml`` says the same): `check_version` runs
when a gateway or a DICOM sink starts and raises on any other version, so an upgrade re-checks every item
here before it ships instead of failing in production.

- `receive_into`, `received_file`: pynetdicom's chunked receive (``_config.STORE_RECV_CHUNKED_DATASET``)
  writes each incoming data set to a ``NamedTemporaryFile`` in the system temporary directory, with no way
  to choose it; the gateway wants it in a reusable file of its spool volume (`producers.gateway_slots`), so
  that making it durable is cheap and nothing is copied. A configurable directory was proposed upstream
  and not merged (https://github.com/pydicom/pynetdicom/pull/526); we replace the module's
  ``NamedTemporaryFile`` and read the file back from the request (``_dataset_file``). Each
  file's meta group is built there as a pydicom ``FileMetaDataset`` and written element by element (0.6 ms
  of CPU a file); we encode the same bytes directly (`file_meta_bytes`).
- `read_whole_pdus`: ``AssociationSocket.recv`` reads a PDU 4096 bytes per ``socket.recv`` call, each
  appended to a growing ``bytearray`` (about 140 calls and Python loop turns per 512 KB CT slice, 45,000
  for a 324-slice study); we read into one buffer of the PDU's size with ``recv_into``, as much as the
  socket holds per call. No upstream report yet.
- `copy_contexts_cheaply`: every accepted connection deep-copies the server's presentation contexts
  (``RequestHandler._create_association``); for every storage SOP class in every transfer syntax that is
  7,600 pydicom ``UID`` objects, each validated again by a regex: 45 ms of CPU a connection (a port
  probe too). Only the contexts and their transfer syntax lists are ever changed during negotiation, so
  we copy those and share the immutable UIDs.
- `keep_responses`: a C-STORE response that the association's reactor thread takes by mistake goes back to
  the waiting ``send_c_store`` (see its docstring; related reports:
  https://github.com/pydicom/pynetdicom/issues/842, https://github.com/pydicom/pynetdicom/issues/850).
- `record_rejections`: ``Association.is_rejected`` is set by the association thread only if, when it wakes
  from waiting for the connection (``ACSE._negotiate_as_requestor``: ``socket._ready.wait()``), the socket
  is still connected. A peer that answers A-ASSOCIATE-RJ and closes at once (as PS3.8 9.2 lets it) can
  have the DUL thread read the rejection and close the socket first when the waiting thread is slow to
  get the CPU: pynetdicom then aborts, with neither ``is_rejected`` nor the ACSE events (a permanent
  rejection read as a transient failure). The DUL thread's own ``EVT_PDU_RECV`` sees every A-ASSOCIATE-RJ.
  No upstream report yet.
- `wake_promptly`: pynetdicom's two threads per association poll. The association thread sleeps 1 ms
  before each look for a decoded DIMSE message (``Association._run_reactor``), and the DUL thread, after a
  turn with nothing to do, sleeps ``_run_loop_delay`` (1 ms) before it looks at the socket and at the
  primitives waiting to be sent (``DULServiceProvider.run_reactor``). A C-STORE waits out up to three such
  sleeps (the request noticed, its response sent, the next request read): about 1.5 ms a file, 0.5 s on a
  324-slice CT. We give pynetdicom's ``dul`` and ``association`` modules a ``time`` whose ``sleep``, in
  those two loops, ends as soon as there is something to do: a message or a primitive put on their
  queues, or data on the socket; the same bound as before when nothing comes. No upstream report yet.
- `dul_socket`, `has_requested`, `register_server`: reach-ins the gateway needs for TCP_NODELAY, for
  telling a connection that sent an A-ASSOCIATE-RQ from a silent one at shutdown, and for a server
  class of its own (TLS handshake off the accept loop: pynetdicom's ``AssociationServer.get_request``
  does the handshake in the accept loop; the same flaw reported elsewhere:
  https://github.com/fo-dicom/fo-dicom/issues/1766; no pynetdicom issue yet).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import select
import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import IO, Any

import pynetdicom
from pynetdicom import (
    PYNETDICOM_IMPLEMENTATION_UID,
    PYNETDICOM_IMPLEMENTATION_VERSION,
    _config,
    dimse_messages,
    evt,
)
from pynetdicom import association as association_module
from pynetdicom import dul as dul_module
from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ASSOCIATE_RJ
from pynetdicom.presentation import PresentationContext
from pynetdicom.transport import AssociationSocket, ThreadedAssociationServer

__all__ = [
    "SUPPORTED",
    "UnsupportedPynetdicom",
    "check_version",
    "copy_contexts_cheaply",
    "dul_socket",
    "file_meta_bytes",
    "has_requested",
    "keep_responses",
    "read_whole_pdus",
    "receive_into",
    "received_file",
    "record_rejections",
    "register_server",
    "wake_promptly",
]

SUPPORTED = ((3, 0, 0), (3, 1, 0))
"""[lowest, highest) pynetdicom versions every item here was written for and tested with."""


class UnsupportedPynetdicom(RuntimeError):
    """The installed pynetdicom is outside `SUPPORTED`: re-check this module's items before using it."""


def check_version(version: str = pynetdicom.__version__) -> None:
    """Raise `UnsupportedPynetdicom` unless ``version`` is within `SUPPORTED`."""
    parts = tuple(int(part) for part in version.split(".")[:3] if part.isdigit())
    low, high = SUPPORTED
    if not low <= parts < high:
        supported = f"{'.'.join(map(str, low))} <= version < {'.'.join(map(str, high))}"
        raise UnsupportedPynetdicom(
            f"pynetdicom {version} is not supported (MWM's patches were written for {supported}: "
            "see wm/pynetdicom_patches.py)"
        )


def receive_into(open_file: Callable[[], Any]) -> None:
    """Receive every C-STORE data set streamed into a file ``open_file()`` returns (process-wide).

    Turns on ``STORE_RECV_CHUNKED_DATASET`` (each PDU's fragment is written and flushed as it arrives, never
    the whole data set in memory) and opens each data set's file with ``open_file`` instead of a
    ``NamedTemporaryFile``: what it returns needs ``write``, ``file.flush``, ``close`` and ``name``. After
    the C-STORE handler returns, pynetdicom closes it and deletes the file at ``name`` (errors ignored).
    The handler finds it with `received_file`.
    """
    check_version()
    _config.STORE_RECV_CHUNKED_DATASET = True

    def opened(**_: Any) -> Any:  # pynetdicom asks for delete=False, mode="wb", suffix=".dcm"
        return open_file()

    dimse_messages.NamedTemporaryFile = opened  # type: ignore[attr-defined,assignment]
    # decode_msg calls write_file_meta_info(file, create_file_meta(...)), and nothing else there does.
    dimse_messages.create_file_meta = file_meta_bytes  # type: ignore[attr-defined,assignment]
    dimse_messages.write_file_meta_info = _write_bytes  # type: ignore[attr-defined,assignment]


def received_file(event: evt.Event) -> Any:
    """The file a C-STORE's data set was received into (see `receive_into`)."""
    return event.request._dataset_file


def file_meta_bytes(*, sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str) -> bytes:
    """The file meta group pynetdicom's ``create_file_meta`` + ``write_file_meta_info`` write, byte for byte.

    Explicit VR little endian: group length, version, the SOP class and instance, the transfer syntax and
    pynetdicom's implementation UID and version name (UIDs padded with NUL, text with a space).
    """
    body = b"".join(
        (
            _element(0x0001, b"OB", b"\x00\x01"),
            _element(0x0002, b"UI", _padded(sop_class_uid, b"\x00")),
            _element(0x0003, b"UI", _padded(sop_instance_uid, b"\x00")),
            _element(0x0010, b"UI", _padded(transfer_syntax, b"\x00")),
            _element(0x0012, b"UI", _padded(PYNETDICOM_IMPLEMENTATION_UID, b"\x00")),
            _element(0x0013, b"SH", _padded(PYNETDICOM_IMPLEMENTATION_VERSION, b" ")),
        )
    )
    return _element(0x0000, b"UL", struct.pack("<I", len(body))) + body


def _element(element: int, vr: bytes, value: bytes) -> bytes:
    if vr == b"OB":  # 2 reserved bytes and a 4-byte length
        return struct.pack("<HH2s2xI", 0x0002, element, vr, len(value)) + value
    return struct.pack("<HH2sH", 0x0002, element, vr, len(value)) + value


def _padded(text: str, pad: bytes) -> bytes:
    value = text.encode("ascii")
    return value + pad if len(value) % 2 else value


def _write_bytes(stream: IO[bytes], data: bytes) -> None:
    stream.write(data)


PREALLOCATED_PDU_BYTES = 4 << 20
"""The most a PDU read allocates before its bytes arrive: a peer announcing a huge PDU and sending nothing
must not make us allocate what it announced."""


def read_whole_pdus() -> None:
    """Read each PDU with as few ``recv`` calls as the socket allows (process-wide; see the module docstring).

    Same contract as pynetdicom's ``AssociationSocket.recv``: blocks until ``nr_bytes`` are read and returns
    them, or fewer when the peer closed the connection; socket errors propagate.
    """
    check_version()
    AssociationSocket.recv = _recv_whole  # type: ignore[method-assign]


def _recv_whole(self: AssociationSocket, nr_bytes: int) -> bytearray:
    sock = self.socket
    assert sock is not None, "pynetdicom reads only from a connected socket"
    buffer = bytearray(min(nr_bytes, PREALLOCATED_PDU_BYTES))
    read = 0
    with memoryview(buffer) as view:
        while read < len(buffer):
            count = sock.recv_into(view[read:])
            if not count:
                return buffer[:read]  # the peer closed the connection
            read += count
    while read < nr_bytes:  # longer than the preallocation: the rest as it arrives
        chunk = sock.recv(min(nr_bytes - read, PREALLOCATED_PDU_BYTES))
        if not chunk:
            break
        buffer += chunk
        read += len(chunk)
    return buffer


class _ContextsCopiedCheaply(list[PresentationContext]):
    """The server's contexts; ``deepcopy`` copies each context and its transfer syntax list, not the UIDs."""

    def __deepcopy__(self, memo: dict[int, Any]) -> list[PresentationContext]:
        copies = []
        for context in self:
            twin = copy.copy(context)
            twin._transfer_syntax = list(context._transfer_syntax)
            copies.append(twin)
        return copies


def copy_contexts_cheaply(server: ThreadedAssociationServer) -> None:
    """Make ``server``'s per-connection copy of its presentation contexts cheap (see the module docstring)."""
    server.contexts = _ContextsCopiedCheaply(server.contexts)


def keep_responses(assoc: Association) -> None:
    """Give a C-STORE response the association's reactor took back to the waiting ``send_c_store``.

    In pynetdicom 3.0 ``send_c_store`` pauses the reactor thread by clearing a checkpoint and waiting for
    its ``_is_paused`` flag, but the flag is also set just before a checkpoint the reactor passes straight
    through: under load (GIL contention) the reactor then takes the response off the DIMSE queue, logs
    "Received unexpected C-STORE service message" and drops it, and ``send_c_store`` waits out the DIMSE
    timeout (30 s) and aborts (seen here in 5 of 12 exports of 324 files, on a loaded machine). Only one
    request is outstanding at a time, so a response the reactor takes goes back on the queue for it.
    """
    serve = assoc._serve_request

    def serve_or_requeue(msg: Any, context_id: int) -> None:
        if msg.is_valid_response:
            assoc.dimse.msg_queue.put((context_id, msg))
        else:
            serve(msg, context_id)

    setattr(assoc, "_serve_request", serve_or_requeue)  # noqa: B010 (an instance override of a method)


def record_rejections(reasons: list[str]) -> tuple[evt.NotificationEvent, Callable[[evt.Event], None]]:
    """An ``evt_handlers`` entry appending each A-ASSOCIATE-RJ's result, source and reason to ``reasons``.

    Bound to the PDU the DUL thread decodes, not to the association thread's ``is_rejected`` or ACSE events,
    which a rejection followed at once by the peer's close can bypass (see the module docstring): a
    requestor whose ``reasons`` is not empty was rejected, whatever ``Association.is_rejected`` says.
    """

    def record(event: evt.Event) -> None:
        pdu = event.pdu
        if isinstance(pdu, A_ASSOCIATE_RJ):
            primitive = pdu.to_primitive()  # its words, as the ACSE's (the PDU's own differ)
            reasons.append(f"{primitive.result_str}, {primitive.source_str}: {primitive.reason_str}")

    return evt.EVT_PDU_RECV, record


def dul_socket(assoc: Association) -> socket.socket | None:
    """The TCP socket under ``assoc`` (None before it connects or after it closed)."""
    connection = assoc.dul.socket
    return connection.socket if connection is not None else None


def has_requested(assoc: Association) -> bool:
    """Whether the peer of an accepted connection has sent its A-ASSOCIATE-RQ.

    Sta3 is the DUL holding the request for the association thread (PS3.8 9.2); once that thread takes it,
    ``requestor.primitive`` is set. Before the request the DUL is in Sta1 (starting, or the peer left) or
    Sta2 (waiting, ARTIM running); Sta13 without a request is a request the DUL itself refused.
    """
    return assoc.dul.state_machine.current_state == "Sta3" or assoc.requestor.primitive is not None


def register_server(ae: pynetdicom.AE, server: ThreadedAssociationServer) -> None:
    """Register a server started outside ``AE.start_server`` (which takes no server class) with ``ae``.

    As ``start_server`` does: ``AssociationServer.shutdown`` removes the server from this list.
    """
    ae._servers.append(server)


def wake_promptly() -> None:
    """Let pynetdicom's association and DUL threads wake when there is work (process-wide; see above)."""
    check_version()
    if getattr(DULServiceProvider.run_reactor, "wakes_promptly", False):
        return
    clock = _Clock()
    dul_module.time = clock  # type: ignore[assignment,attr-defined]
    association_module.time = clock  # type: ignore[assignment,attr-defined]
    DULServiceProvider.run_reactor = _dul_reactor(DULServiceProvider.run_reactor)  # type: ignore[method-assign,assignment]
    Association._run_reactor = _association_reactor(Association._run_reactor)  # type: ignore[method-assign,assignment]


_naps = threading.local()  # the ``nap`` of a thread running one of the two loops
_wakes_lock = threading.Lock()


class _Clock:
    """The ``time`` module, but a thread with a ``nap`` (one of the two loops) naps instead of sleeping."""

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    @staticmethod
    def sleep(seconds: float) -> None:
        nap = getattr(_naps, "nap", None)
        if nap is None:
            time.sleep(seconds)
        else:
            nap(seconds)


class _Wake:
    """One association's wake-ups: an event for its association thread, a socket pair for its DUL thread
    (which also waits for its peer's socket, so it waits in ``select``)."""

    def __init__(self) -> None:
        self.reactor = threading.Event()
        self._receiver, self._sender = socket.socketpair()
        self._receiver.setblocking(False)
        self._sender.setblocking(False)

    def wake_dul(self) -> None:
        with contextlib.suppress(OSError):  # full (a wake-up is pending anyway) or closed (the DUL ended)
            self._sender.send(b"\0")

    def dul_nap(self, dul: DULServiceProvider, seconds: float) -> None:
        peer = dul_socket(dul.assoc)
        try:
            select.select([self._receiver] if peer is None else [self._receiver, peer], [], [], seconds)
            while self._receiver.recv(4096):
                pass
        except (OSError, ValueError):  # the peer's socket closed meanwhile (BlockingIOError: drained)
            return

    def reactor_nap(self, seconds: float) -> None:
        self.reactor.wait(seconds)
        self.reactor.clear()  # cleared before the loop looks: a put after this wakes the next nap

    def close(self) -> None:
        self._receiver.close()
        self._sender.close()


def _wake_of(assoc: Association) -> _Wake:
    with _wakes_lock:
        wake: _Wake | None = getattr(assoc, "_mwm_wake", None)
        if wake is None:
            wake = _Wake()
            setattr(assoc, "_mwm_wake", wake)  # noqa: B010 (our attribute on pynetdicom's object)
    return wake


def _then(put: Callable[..., None], wake: Callable[[], object]) -> Callable[..., None]:
    def put_and_wake(*args: Any, **kwargs: Any) -> None:
        put(*args, **kwargs)
        wake()

    return put_and_wake


def _dul_reactor(run: Callable[[DULServiceProvider], None]) -> Callable[[DULServiceProvider], None]:
    @functools.wraps(run)
    def run_waking(self: DULServiceProvider) -> None:
        wake = _wake_of(self.assoc)
        self.to_provider_queue.put = _then(self.to_provider_queue.put, wake.wake_dul)  # type: ignore[method-assign]
        _naps.nap = functools.partial(wake.dul_nap, self)
        try:
            run(self)
        finally:
            _naps.nap = None
            wake.close()

    run_waking.wakes_promptly = True  # type: ignore[attr-defined]
    return run_waking


def _association_reactor(run: Callable[[Association], None]) -> Callable[[Association], None]:
    @functools.wraps(run)
    def run_waking(self: Association) -> None:
        wake = _wake_of(self)
        self.dimse.msg_queue.put = _then(self.dimse.msg_queue.put, wake.reactor.set)  # type: ignore[method-assign]
        self.dul.to_user_queue.put = _then(self.dul.to_user_queue.put, wake.reactor.set)  # type: ignore[method-assign]
        _naps.nap = wake.reactor_nap
        try:
            run(self)
        finally:
            _naps.nap = None

    return run_waking
