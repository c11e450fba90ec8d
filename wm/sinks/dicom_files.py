"""The DICOM sink's downloads: a file fetched from the object store, its file meta read, ready to send.

With the wire sender, a file is held in memory between its download and its send when it is small
(``export.in_memory_max_bytes``) and the files every export of the process holds stay within
``export.in_memory_total_bytes`` (the exporter runs up to its prefetch count of tasks at once, each with
files downloaded ahead of its lanes); any other file is streamed to the task's scratch directory. Held in
memory, a file costs no disk write and read back, and its download about 40% less CPU in the exporter's
own threads, which share the GIL with the send (bench/README.md). A held file's bytes count against the
budget until the `LocalFile` holding them is gone.
"""

from __future__ import annotations

import asyncio
import io
import threading
import weakref
from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_dataset, read_preamble
from pydicom.tag import BaseTag

from schemas.events import FileExportResult, FileRef
from wm.config import ExportSettings
from wm.errors import NotFound
from wm.ports import FileSource
from wm.sinks.dicom_lanes import LocalFile


class MemoryBudget:
    """Bytes of downloaded files held in memory, within per-file and total limits (thread-safe: the
    object store's threads ask it)."""

    def __init__(self) -> None:
        self.used = 0
        self._lock = threading.Lock()

    def take(self, size: int, file_limit: int, total_limit: int) -> bool:
        """Count ``size`` bytes as held, if a file that large may be and the total stays within its limit."""
        with self._lock:
            if size > file_limit or self.used + size > total_limit:
                return False
            self.used += size
            return True

    def give_back(self, size: int) -> None:
        """The bytes of a held file are no longer held."""
        with self._lock:
            self.used -= size


HELD = MemoryBudget()
"""What every export of this process holds in memory."""


async def fetch(
    objects: FileSource, file: FileRef, path: Path, settings: ExportSettings
) -> LocalFile | FileExportResult:
    """Download ``file`` (held in memory if the budget allows, else to ``path``) and read its file meta;
    a failed result when it is missing or not DICOM."""
    held = 0

    def hold(size: int) -> bool:
        nonlocal held
        limits = settings.in_memory_max_bytes, settings.in_memory_total_bytes
        if settings.sender != "wire" or not HELD.take(size, *limits):
            return False  # pynetdicom's lanes send from a file
        held = size
        return True

    try:
        data = await objects.fetch(file.key, path, hold)
    except NotFound:
        return failure(file.key, "not found in the object store")
    except BaseException:
        HELD.give_back(held)
        raise
    try:
        # Held in memory: read here (about 0.15 ms of CPU, less than a thread hop costs).
        if data is None:
            meta, offset = await asyncio.to_thread(split_file_meta, path)
        else:
            meta, offset = split_file_meta(data)
        local = LocalFile(
            file,
            path,
            sop_class_uid=str(meta.MediaStorageSOPClassUID),
            transfer_syntax_uid=str(meta.TransferSyntaxUID),
            sop_instance_uid=str(meta.MediaStorageSOPInstanceUID),
            dataset_offset=offset,
            data=data,
        )
    except (InvalidDicomError, AttributeError, OSError, EOFError) as exc:
        HELD.give_back(held)
        return failure(file.key, f"not a DICOM file: {exc}")
    if held:
        weakref.finalize(local, HELD.give_back, held)
    return local


def split_file_meta(source: bytes | Path) -> tuple[Dataset, int]:
    """A DICOM file's meta information and the offset of its data set, from its bytes or its path.

    As pynetdicom's ``split_dataset`` (a third of ``read_file_meta_info``'s CPU), for bytes too.
    """
    with io.BytesIO(source) if isinstance(source, bytes) else source.open("rb") as handle:
        read_preamble(handle, False)
        meta = read_dataset(handle, is_implicit_VR=False, is_little_endian=True, stop_when=_after_file_meta)
        return meta, handle.tell()


def _after_file_meta(tag: BaseTag, vr: str | None, length: int) -> bool:
    return tag.group != 0x0002


def failure(key: str, error: str) -> FileExportResult:
    """A file's failed result."""
    return FileExportResult(key=key, status="failed", error=error)
