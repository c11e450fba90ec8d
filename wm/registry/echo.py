"""An optional check on sink creation: does the DICOM peer answer a C-ECHO?"""

from __future__ import annotations

import asyncio

from pynetdicom import AE

from schemas.applications import DicomSinkArgs

SUCCESS = 0x0000
"""DICOM status: success."""

VERIFICATION = "1.2.840.10008.1.1"
"""The Verification SOP class (C-ECHO)."""


async def echo(args: DicomSinkArgs, timeout_s: float) -> str | None:
    """C-ECHO the sink's peer from a worker thread: None when it answers with success, else the reason.

    ``timeout_s`` bounds the association, the DIMSE exchange and the network (``export.echo_timeout_s``).
    """
    return await asyncio.to_thread(_echo, args, timeout_s)


def _echo(args: DicomSinkArgs, timeout_s: float) -> str | None:
    ae = AE(ae_title=args.calling_ae_title)
    ae.add_requested_context(VERIFICATION)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    peer = f"{args.ae_title}@{args.host}:{args.port}"
    association = ae.associate(args.host, args.port, ae_title=args.ae_title)
    if not association.is_established:
        return f"C-ECHO to {peer} failed: association not established (refused, rejected or no answer)"
    try:
        status = association.send_c_echo()
    finally:
        association.release()
    if not status or status.Status != SUCCESS:
        return f"C-ECHO to {peer} failed: status {getattr(status, 'Status', 'none')}"
    return None
