"""Every place MWM works around pynetdicom or reaches into its internals, in one module.

Each item names what it relies on, why it exists and its upstream reference. They were written for, and
tested with, the versions in `SUPPORTED` (the pin in ``pyproject.toml`` says the same): `check_version` runs
when a gateway or a DICOM sink starts and raises on any other version, so an upgrade re-checks every item
here before it ships instead of failing in production.

- `receive_into`: pynetdicom's chunked receive (``_config.STORE_RECV_CHUNKED_DATASET``) writes each
  incoming data set to a ``NamedTemporaryFile`` in the system temporary directory, with no way to choose
  it; the gateway wants it on its spool volume so that a received file is renamed into the spool, not
  copied. A configurable directory was proposed upstream and not merged
  (https://github.com/pydicom/pynetdicom/pull/526); we replace the module's ``NamedTemporaryFile``.
- `keep_responses`: a C-STORE response that the association's reactor thread takes by mistake goes back to
  the waiting ``send_c_store`` (see its docstring; related reports:
  https://github.com/pydicom/pynetdicom/issues/842, https://github.com/pydicom/pynetdicom/issues/850).
- `dul_socket`, `has_requested`, `register_server`: reach-ins the gateway needs for TCP_NODELAY, for
  telling a connection that sent an A-ASSOCIATE-RQ from a silent one at shutdown, and for a server
  class of its own (TLS handshake off the accept loop: pynetdicom's ``AssociationServer.get_request``
  does the handshake in the accept loop; the same flaw reported elsewhere:
  https://github.com/fo-dicom/fo-dicom/issues/1766; no pynetdicom issue yet).
"""

from __future__ import annotations

import functools
import socket
import tempfile
from pathlib import Path
from typing import Any

import pynetdicom
from pynetdicom import _config, dimse_messages
from pynetdicom.association import Association
from pynetdicom.transport import ThreadedAssociationServer

__all__ = [
    "SUPPORTED",
    "UnsupportedPynetdicom",
    "check_version",
    "dul_socket",
    "has_requested",
    "keep_responses",
    "receive_into",
    "register_server",
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


def receive_into(directory: Path) -> None:
    """Receive every C-STORE data set streamed to a file in ``directory`` (process-wide).

    Turns on ``STORE_RECV_CHUNKED_DATASET`` (each PDU's fragment is written and flushed as it arrives, never
    the whole data set in memory) and makes its temporary files in ``directory``. pynetdicom removes the
    file after the C-STORE handler returns, ignoring a file the handler renamed away.
    """
    check_version()
    directory.mkdir(parents=True, exist_ok=True)
    _config.STORE_RECV_CHUNKED_DATASET = True
    dimse_messages.NamedTemporaryFile = functools.partial(  # type: ignore[attr-defined,assignment]
        tempfile.NamedTemporaryFile, dir=directory
    )


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
