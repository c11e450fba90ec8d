"""The DICOM sink's lanes: what sends over one association at a time, and pynetdicom's lane.

`SendLane` is what the sink's asyncio code (`wm.sinks.dicom`) drives: open an association, send files
over it, release it. Two kinds implement it: `wm.sinks.dicom_wire.WireLane` (the default, ``export.sender
= "wire"``: the exporter's event loop writes each file's stored bytes itself) and `ExecutorLane` here
(``export.sender = "pynetdicom"``): pynetdicom's blocking calls run in one worker per lane, a thread or a
process. Both map a C-STORE status to a file's result with `store_result`.

A lane's worker holds at most one association at a time (in a thread-local, so the same functions serve
a lane's thread and a lane's process, whose calls all run on its one worker thread). The sink's asyncio
code (`wm.sinks.dicom`) decides what to send, retries and maps errors; the worker only opens, sends over
and releases the association, and returns picklable results.

Why processes: sending is CPU-bound in pynetdicom (about 10,000 P-DATA PDUs through its DUL thread for
the 324-slice CT, one Python round trip each, 2.2 to 3.7 s of CPU), so lanes in threads share one GIL
with each other and with the downloads. A lane in its own process sends on its own core; the files go by
path (the parent downloads them to its scratch directory), so only paths and results cross the pipe.

Processes come from a ``forkserver`` (never ``fork`` from the exporter's threaded, asyncio process) that
has this module preloaded, so starting a lane costs a fork, not an interpreter start.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import socket
import threading
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from pynetdicom import AE, _config, build_context, evt
from pynetdicom.association import Association
from pynetdicom.status import STATUS_SUCCESS, STATUS_WARNING, code_to_category

from schemas.applications import DicomSinkArgs
from schemas.events import FileExportResult, FileRef
from wm.config import ExportSettings
from wm.pynetdicom_patches import dul_socket, keep_responses, record_rejections

MAX_MESSAGE_ID = 0xFFFF
STORED_CATEGORIES = frozenset({STATUS_SUCCESS, STATUS_WARNING})
"""C-STORE status categories that mean the destination kept the instance (warnings: coerced elements)."""

# Send files as stored, streamed from disk in PDU-sized chunks, never decoded into memory (set on import,
# so in every lane process too).
_config.STORE_SEND_CHUNKED_DATASET = True

_lane = threading.local()
"""The worker's association (``_lane.assoc``), if it holds one."""


@dataclass(frozen=True)
class LocalFile:
    """A downloaded file ready to send: where its data set starts (after the file meta) and what it is.

    Its bytes are in ``data`` when it was small enough to be kept in memory (``export.in_memory_max_bytes``,
    wire sender only), else in the file at ``path``.
    """

    ref: FileRef
    path: Path
    sop_class_uid: str
    transfer_syntax_uid: str
    sop_instance_uid: str
    dataset_offset: int
    data: bytes | None = field(default=None, repr=False, compare=False)
    """Not in its repr (a log line or a traceback) nor in comparisons: megabytes."""


@dataclass(frozen=True)
class Opened:
    """An association attempt's outcome: the accepted (SOP class, transfer syntax) pairs, or why not."""

    accepted: frozenset[tuple[str, str]] = frozenset()
    problem: str = ""
    rejected: bool = False

    @property
    def established(self) -> bool:
        """Whether the worker now holds an association."""
        return not self.problem


class SendLane(Protocol):
    """One association at a time to the sink's destination (``DicomSinkArgs``)."""

    async def open(self, pairs: list[tuple[str, str]]) -> Opened:
        """Request an association proposing ``pairs`` (after releasing one the lane still holds)."""

    async def store_all(self, files: list[LocalFile], first_id: int) -> list[FileExportResult]:
        """C-STORE ``files`` in order: their results, ending early when the association is gone (the
        files without a result are to be sent again). Message ids count on from ``first_id``."""

    async def release(self) -> None:
        """Release the lane's association, if it holds one."""

    def close(self) -> None:
        """Let go of the lane's resources (a cancelled lane's worker ends once its current C-STORE does)."""


class ExecutorLane:
    """A `SendLane` on pynetdicom: its blocking calls run in one worker of their own (`lane_executor`)."""

    def __init__(self, args: DicomSinkArgs, settings: ExportSettings) -> None:
        self.args, self.settings = args, settings
        self.worker = lane_executor(settings.send_processes)

    async def open(self, pairs: list[tuple[str, str]]) -> Opened:
        """See `SendLane.open`."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.worker, open_association, self.args, self.settings, pairs)

    async def store_all(self, files: list[LocalFile], first_id: int) -> list[FileExportResult]:
        """See `SendLane.store_all`: one hand-off to the worker for all of ``files``."""
        paths = [(item.path, item.ref.key) for item in files]
        return await asyncio.get_running_loop().run_in_executor(self.worker, store_all, paths, first_id)

    async def release(self) -> None:
        """See `SendLane.release`."""
        await asyncio.get_running_loop().run_in_executor(self.worker, release)

    def close(self) -> None:
        """See `SendLane.close`: a process exits and its socket closes."""
        self.worker.shutdown(wait=False, cancel_futures=True)


def lane_executor(use_process: bool) -> Executor:
    """A single-worker executor for one lane: its own process, or a thread of the exporter's."""
    if not use_process:
        return ThreadPoolExecutor(1, thread_name_prefix="mwm-scu")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    return ProcessPoolExecutor(1, mp_context=context)


def open_association(args: DicomSinkArgs, settings: ExportSettings, pairs: list[tuple[str, str]]) -> Opened:
    """Request an association proposing ``pairs`` (releases one the worker still holds first)."""
    release()
    ae = AE(ae_title=args.calling_ae_title)
    ae.acse_timeout = ae.connection_timeout = settings.acse_timeout_s
    ae.dimse_timeout = ae.network_timeout = settings.dimse_timeout_s
    destination = f"{args.ae_title}@{args.host}:{args.port}"
    rejection: list[str] = []
    assoc = ae.associate(
        args.host,
        args.port,
        contexts=[build_context(sop_class, [syntax]) for sop_class, syntax in pairs],
        ae_title=args.ae_title,
        evt_handlers=[(evt.EVT_CONN_OPEN, _set_nodelay), record_rejections(rejection)],
    )
    if rejection:  # not assoc.is_rejected, which pynetdicom may miss (see `record_rejections`)
        return Opened(problem=f"association rejected by {destination}: {rejection[0]}", rejected=True)
    if not assoc.is_established:
        return Opened(problem=f"no association with {destination} (refused, aborted or timed out)")
    keep_responses(assoc)
    _lane.assoc = assoc
    return Opened(
        frozenset((str(cx.abstract_syntax), str(cx.transfer_syntax[0])) for cx in assoc.accepted_contexts)
    )


def store(path: Path, key: str, message_id: int) -> FileExportResult | None:
    """C-STORE one file: its result, or None when the association is gone (retry the file)."""
    assoc: Association | None = getattr(_lane, "assoc", None)
    if assoc is None or not assoc.is_established:
        return None
    try:
        status = assoc.send_c_store(path, msg_id=message_id)
    except (ValueError, AttributeError) as exc:  # no accepted context for it, or incomplete file meta
        return FileExportResult(key=key, status="failed", error=f"not sent: {exc}")
    if "Status" not in status:
        return None
    return store_result(key, int(status.Status))


def store_result(key: str, code: int) -> FileExportResult:
    """A file's result from its C-STORE response status: Success or Warning -> succeeded, else failed."""
    category = code_to_category(code)
    if category in STORED_CATEGORIES:
        return FileExportResult(key=key, status="succeeded")
    return FileExportResult(key=key, status="failed", error=f"C-STORE status 0x{code:04X} ({category})")


def store_all(files: list[tuple[Path, str]], first_id: int) -> list[FileExportResult]:
    """C-STORE ``files`` (path, key) in order: their results, ending early when the association is gone
    (the files without a result are to be sent again). Message ids count on from ``first_id``."""
    results: list[FileExportResult] = []
    for offset, (path, key) in enumerate(files):
        result = store(path, key, (first_id + offset) % MAX_MESSAGE_ID + 1)
        if result is None:
            break
        results.append(result)
    return results


def release() -> None:
    """Release the worker's association, if it holds an established one."""
    assoc: Association | None = getattr(_lane, "assoc", None)
    _lane.assoc = None
    if assoc is not None and assoc.is_established:
        assoc.release()


def _set_nodelay(event: Any) -> None:
    """EVT_CONN_OPEN: no Nagle delay on the association's socket."""
    sock = dul_socket(event.assoc)
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
