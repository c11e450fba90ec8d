"""The gateway's pynetdicom AE and the connection-level helpers its SCP uses (`producers.gateway`)."""

from __future__ import annotations

import contextlib
import socket
import threading
import time

from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from wm.config import GatewaySettings
from wm.pynetdicom_patches import dul_socket, read_whole_pdus, wake_promptly

__all__ = ["MAX_PDU_SIZE", "abort_all", "application_entity", "close_connection", "disable_nagle", "join_all"]

MAX_PDU_SIZE = 0
"""Maximum PDU length we receive: 0 = unlimited, so senders use large PDUs (far fewer round trips)."""


def join_all(threads: list[threading.Thread], timeout_s: float) -> None:
    """Wait for ``threads`` to end, ``timeout_s`` seconds at most in all."""
    deadline = time.monotonic() + timeout_s
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))


def abort_all(associations: list[Association]) -> None:
    for assoc in associations:
        assoc.abort()


def close_connection(assoc: Association) -> None:
    """Shut down the connection under ``assoc``; its DUL thread then sees the peer gone and ends it.

    A shutdown rather than a close: the DUL thread polls and reads the socket, and a descriptor closed under
    another thread can be reused by a new one; the DUL closes it when it sees the end of the stream.
    """
    sock = dul_socket(assoc)
    if sock is not None:
        with contextlib.suppress(OSError):  # already closed, by the peer or by the DUL
            sock.shutdown(socket.SHUT_RDWR)


def disable_nagle(event: evt.Event) -> None:
    """EVT_CONN_OPEN: set TCP_NODELAY, or every C-STORE response waits on a 40 ms delayed ACK."""
    sock = dul_socket(event.assoc)
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def application_entity(settings: GatewaySettings) -> AE:
    """An AE accepting C-ECHO and every storage SOP class, in every transfer syntax (stored as sent).

    Its process reads PDUs whole and wakes pynetdicom's threads when they have work
    (`wm.pynetdicom_patches.read_whole_pdus`, `wm.pynetdicom_patches.wake_promptly`).
    """
    read_whole_pdus()
    wake_promptly()
    ae = AE()
    ae.maximum_associations = settings.max_associations
    ae.acse_timeout = settings.acse_timeout_s
    ae.maximum_pdu_size = MAX_PDU_SIZE
    ae.add_supported_context(Verification)
    for context in AllStoragePresentationContexts:
        assert context.abstract_syntax is not None
        ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
    return ae
