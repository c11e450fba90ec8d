"""The spool's slots: reusable files that received data sets overwrite, so making one durable is cheap.

Why reuse: on ext4 (as on most journaling file systems) making a *new* file durable commits a journal
transaction for its inode, its blocks and its directory entry on top of its data. Here, for a 0.5 MB CT
slice, a new file's ``fdatasync`` plus the rename and the directory ``fsync`` cost 2.2 to 3.2 ms; the same
bytes written over a file whose blocks are already on disk, then ``fdatasync``, 1.1 ms (bench/README.md).
Databases recycle their log segments for the same reason.

A slot is a file in ``slots/``. Its first 128 bytes are the DICOM preamble, which PS3.10 7.1 leaves to the
application; while the slot holds an accepted file they hold its record (`SlotRecord`): a magic, the file's
length, its sequence number, its payload id, the CRC-32 of the file as uploaded (its preamble zeroed) and a
CRC-32 of the record. The bytes past ``length`` are left from an earlier, longer file. What a crash can
leave:

- a slot rewritten but not made durable (its sender got no success): its CRCs do not match, it is free;
- a slot released after its upload but before the release reached the disk: its record is valid, so its
  file is uploaded and announced again, a duplicate that MWM's consumers drop (as for any crash).

Slots are created when none is free (the first use of a new one also syncs ``slots/``), kept for reuse
once their file is uploaded, and deleted instead when a large file grew them past `KEEP_MAX_BYTES`. So the
spool's disk use stays at its high-water mark; `Slots.preallocate` writes free slots ahead, at start.
"""

from __future__ import annotations

import io
import os
import struct
import threading
import uuid
import zlib
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "KEEP_MAX_BYTES",
    "SLOT_BYTES",
    "SlotReader",
    "SlotRecord",
    "SlotWriter",
    "Slots",
    "fsync_directory",
    "open_slot",
]

PREAMBLE = 128
MAGIC = b"MWMSLOT1"
_RECORD = struct.Struct("<8sQQ32sI")  # magic, length, sequence, payload id (32 hex digits), file CRC-32
_CHECKED = struct.Struct(f"<{_RECORD.size}sI")  # the record and its own CRC-32
SLOT_BYTES = 1 << 20
"""Size a preallocated slot is written to: a CT or MR slice fits; a larger file grows its slot."""
KEEP_MAX_BYTES = 8 << 20
"""A released slot larger than this is deleted, not kept: one large file must not hold its size forever."""
SUFFIX = ".slot"


@dataclass(frozen=True)
class SlotRecord:
    """What a slot holds: an accepted file of ``length`` bytes from association ``payload_id``."""

    length: int
    sequence: int
    payload_id: str
    crc: int

    def encode(self) -> bytes:
        record = _RECORD.pack(MAGIC, self.length, self.sequence, self.payload_id.encode("ascii"), self.crc)
        return _CHECKED.pack(record, zlib.crc32(record))

    @classmethod
    def decode(cls, preamble: bytes) -> SlotRecord | None:
        """The record in a slot's first bytes; None when there is none or it is damaged."""
        if len(preamble) < _CHECKED.size:
            return None
        record, check = _CHECKED.unpack_from(preamble)
        if zlib.crc32(record) != check:
            return None
        magic, length, sequence, payload_id, crc = _RECORD.unpack(record)
        if magic != MAGIC:
            return None
        return cls(length, sequence, payload_id.decode("ascii"), crc)


class SlotWriter:
    """A received data set streamed into a slot: what pynetdicom's chunked receive writes to.

    It stands in for the ``NamedTemporaryFile`` pynetdicom opens (``write``, ``file.flush``, ``close``,
    ``name``). pynetdicom deletes ``name`` after the C-STORE handler returns, so ``name`` is a path that
    never exists, not the slot. A slot not sealed by the time the writer is closed or dropped (the file was
    refused, or the association ended mid-data-set) goes back to the pool.
    """

    def __init__(self, pool: Slots, path: Path, fresh: bool, decoy: Path) -> None:
        self.path = path
        self.fresh = fresh
        self.name = str(decoy)
        self.file = self
        self.length = 0
        self.sealed = False
        self._pool = pool
        self._crc = 0
        self._stream: io.FileIO | None = io.FileIO(path, "r+")

    def write(self, data: bytes | bytearray | memoryview) -> int:
        assert self._stream is not None, "a closed slot is never written to"
        view = memoryview(data).cast("B")
        if self.length < PREAMBLE:  # the CRC is of the file as uploaded: its preamble zeroed
            head = min(len(view), PREAMBLE - self.length)
            self._crc = zlib.crc32(bytes(head), self._crc)
            self._crc = zlib.crc32(view[head:], self._crc)
        else:
            self._crc = zlib.crc32(view, self._crc)
        written = 0
        while written < len(view):
            written += self._stream.write(view[written:]) or 0
        self.length += written
        return written

    def flush(self) -> None:
        """Nothing to do: the writes are unbuffered (pynetdicom flushes after every fragment)."""

    def seal(self, sequence: int, payload_id: str) -> SlotRecord:
        """Record the file in the slot's preamble and make both durable: the file is accepted."""
        assert self._stream is not None
        record = SlotRecord(self.length, sequence, payload_id, self._crc)
        os.pwrite(self._stream.fileno(), record.encode(), 0)
        os.fdatasync(self._stream.fileno())
        if self.fresh:
            fsync_directory(self.path.parent)
        self.sealed = True
        return record

    def close(self) -> None:
        if self._stream is not None:
            self._stream.close()
            self._stream = None
        if not self.sealed:
            self.sealed = True  # released once
            self._pool.release(self.path)

    def __del__(self) -> None:
        if hasattr(self, "_stream"):  # not when __init__ failed to open the slot
            self.close()


class SlotReader(io.RawIOBase):
    """The file a slot holds, as it is uploaded: its first ``length`` bytes with the preamble zeroed."""

    def __init__(self, path: Path, length: int) -> None:
        super().__init__()
        self.name = str(path)  # pydicom names a data set read from a stream after its ``name``
        self._descriptor = os.open(path, os.O_RDONLY)
        self._length = length
        self._position = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self._length}[whence]
        self._position = max(0, base + offset)
        return self._position

    def tell(self) -> int:
        return self._position

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        view = memoryview(buffer).cast("B")
        count = max(0, min(len(view), self._length - self._position))
        data = os.pread(self._descriptor, count, self._position)
        view[: len(data)] = data
        if self._position < PREAMBLE and data:
            zeroed = min(len(data), PREAMBLE - self._position)
            view[:zeroed] = bytes(zeroed)
        self._position += len(data)
        return len(data)

    def close(self) -> None:
        if not self.closed:
            os.close(self._descriptor)
        super().close()


def open_slot(path: Path, length: int) -> io.BufferedReader:
    """The file of ``length`` bytes a slot holds, readable as a binary stream (`SlotReader`, buffered)."""
    return io.BufferedReader(SlotReader(path, length))


class Slots:
    """The pool of slot files under ``directory`` (thread-safe)."""

    def __init__(self, directory: Path, decoys: Path) -> None:
        self.directory = directory
        self._decoys = decoys
        self._lock = threading.Lock()
        self._free: list[Path] = []
        self._count = 0  # slot files that exist
        self._next = 0  # number of the next new slot

    @property
    def count(self) -> int:
        """Slot files on disk, free or holding a file."""
        return self._count

    def take(self) -> SlotWriter:
        """A free slot to receive into, a new one when none is free."""
        decoy = self._decoys / f"{uuid.uuid4().hex}.never"
        with self._lock:
            path = self._free.pop() if self._free else None
            if path is None:
                path, self._next, self._count = self._path(self._next), self._next + 1, self._count + 1
        if path.exists():
            return SlotWriter(self, path, fresh=False, decoy=decoy)
        path.touch()
        return SlotWriter(self, path, fresh=True, decoy=decoy)

    def release(self, path: Path) -> None:
        """Free a slot whose file is uploaded (or was refused): clear its record, keep it for reuse."""
        try:
            size = path.stat().st_size
            if size > KEEP_MAX_BYTES:
                path.unlink()
                with self._lock:
                    self._count -= 1
                return
            descriptor = os.open(path, os.O_WRONLY)
            try:  # not synced: see the module docstring for what a crash then leaves
                os.pwrite(descriptor, bytes(len(MAGIC)), 0)
            finally:
                os.close(descriptor)
        except FileNotFoundError:
            with self._lock:
                self._count -= 1
            return
        with self._lock:
            self._free.append(path)

    def scan(self) -> list[tuple[Path, SlotRecord]]:
        """The slots holding a valid record (at start); every other slot is free."""
        self.directory.mkdir(parents=True, exist_ok=True)
        held: list[tuple[Path, SlotRecord]] = []
        free: list[Path] = []
        paths = sorted(self.directory.glob(f"*{SUFFIX}"))
        for path in paths:
            record = _read_record(path)
            if record is not None and _file_crc(path, record.length) == record.crc:
                held.append((path, record))
            else:
                free.append(path)
        with self._lock:
            self._free, self._count = free, len(paths)
            self._next = 1 + max((int(path.stem) for path in paths if path.stem.isdigit()), default=-1)
        return sorted(held, key=lambda item: item[1].sequence)

    def preallocate(self, count: int) -> int:
        """Write free slots until there are ``count`` slot files; how many were written.

        Each is written with zeros (so its blocks exist on disk) and synced, then ``slots/`` once.
        """
        with self._lock:
            missing = max(0, count - self._count)
            numbers = range(self._next, self._next + missing)
            self._next += missing
            self._count += missing
        zeros = bytes(SLOT_BYTES)
        paths = [self._path(number) for number in numbers]
        for path in paths:
            with open(path, "wb") as stream:
                stream.write(zeros)
                stream.flush()
                os.fdatasync(stream.fileno())
        if paths:
            fsync_directory(self.directory)
        with self._lock:
            self._free.extend(paths)
        return len(paths)

    def _path(self, number: int) -> Path:
        return self.directory / f"{number:08d}{SUFFIX}"


def _read_record(path: Path) -> SlotRecord | None:
    with open(path, "rb") as stream:
        return SlotRecord.decode(stream.read(PREAMBLE))


def _file_crc(path: Path, length: int) -> int:
    crc = 0
    with open_slot(path, length) as stream:
        while chunk := stream.read(1 << 20):
            crc = zlib.crc32(chunk, crc)
    return crc


def fsync_directory(directory: Path) -> None:
    """Make a new entry (a rename, a new file) in ``directory`` durable."""
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
