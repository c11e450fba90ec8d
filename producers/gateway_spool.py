"""The gateway's spool: received files made durable on the gateway's own disk before the C-STORE response.

Layout under ``gateway.spool_dir`` (one volume)::

    slots/<n>.slot             reusable files each data set is streamed into as it arrives; an accepted
                               file's record (length, payload id, CRCs) is in its preamble
                               (`producers.gateway_slots`)
    <payload id>/session.json  the association: AE titles, peer, state (open | complete | aborted)
    incoming/                  nothing is ever written here (pynetdicom's throwaway names point here)

A file is accepted (`Spool.accept`) only once its bytes and its record are on disk, so a success response
is never sent for a file a power cut could lose; the session's record is on disk before its first file.
The uploader removes a file (`Spool.remove`: its slot is freed for the next file) once it is in the object
store and announced. `Spool.recover` lists what a previous run left: the slots holding a valid record whose
session is recorded; a slot being written when the process died has no valid record (its sender did not
get a success and sends it again) and is free.

The size limit: `Spool.full` is true once the accepted files reach ``spool_max_bytes``; the gateway then
answers ``0xA700`` (out of resources) and accepts again as the uploader drains the spool.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from dataclasses import asdict, dataclass, field
from io import BufferedReader
from pathlib import Path
from typing import Literal

import structlog

from producers.gateway_slots import Slots, SlotWriter, fsync_directory, open_slot
from schemas.events import DicomIdentifiers
from wm.dicom import InvalidDicom, read_identifiers

__all__ = ["SessionInfo", "Spool", "SpooledFile"]

log = structlog.get_logger("producers.gateway")

State = Literal["open", "complete", "aborted"]
SESSION = "session.json"
INCOMING = "incoming"
SLOTS = "slots"


@dataclass
class SessionInfo:
    """One association's files in the spool: who sent them and whether the association ended well."""

    payload_id: str
    calling_ae_title: str
    called_ae_title: str
    peer: str
    state: State = "open"
    ended_at: float | None = None
    """Wall-clock time the association ended (released or aborted)."""


@dataclass
class SpooledFile:
    """An accepted file waiting in the spool for its upload and announcement."""

    path: Path
    session: SessionInfo
    ids: DicomIdentifiers
    size: int
    spooled_at: float = field(default_factory=time.time)


class Spool:
    """Durable storage of accepted files, with their count, size and age (thread-safe)."""

    def __init__(self, directory: Path, max_bytes: int) -> None:
        self.directory = directory
        self.incoming = directory / INCOMING
        self.max_bytes = max_bytes
        self.slots = Slots(directory / SLOTS, self.incoming)
        self._lock = threading.Lock()
        self._files: dict[Path, SpooledFile] = {}
        self._bytes = 0
        self._sequence = 0

    # -- accounting ---------------------------------------------------------------------------------------

    @property
    def bytes(self) -> int:
        """Bytes of the accepted files not yet removed."""
        return self._bytes

    @property
    def files(self) -> int:
        """Accepted files not yet removed."""
        return len(self._files)

    def oldest_age_s(self, now: float | None = None) -> float:
        """Age of the oldest accepted file, 0 when the spool is empty."""
        with self._lock:
            oldest = min((item.spooled_at for item in self._files.values()), default=None)
        return 0.0 if oldest is None else max(0.0, (now or time.time()) - oldest)

    def full(self) -> bool:
        """Whether the accepted files have reached the size limit."""
        return self._bytes >= self.max_bytes

    # -- writing (association threads) --------------------------------------------------------------------

    def save_session(self, session: SessionInfo) -> None:
        """Write the session's record (atomically, durably); creates its directory the first time."""
        directory = self.directory / session.payload_id
        created = not directory.exists()
        directory.mkdir(parents=True, exist_ok=True)
        temporary = directory / f".{SESSION}.tmp"
        with open(temporary, "w", encoding="utf-8") as stream:
            json.dump(asdict(session), stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, directory / SESSION)
        fsync_directory(directory)
        if created:
            fsync_directory(self.directory)

    def receiver(self) -> SlotWriter:
        """Where the next received data set is streamed (pynetdicom's chunked receive, `receive_into`)."""
        return self.slots.take()

    def accept(self, received: SlotWriter, session: SessionInfo, ids: DicomIdentifiers) -> SpooledFile:
        """Make the received file durable in its slot; the caller may then answer success."""
        with self._lock:
            self._sequence += 1
            sequence = self._sequence
        received.seal(sequence, session.payload_id)
        return self._track(SpooledFile(received.path, session, ids, received.length))

    @staticmethod
    def open(item: SpooledFile) -> BufferedReader:
        """The accepted file's bytes, as they are uploaded."""
        return open_slot(item.path, item.size)

    def _track(self, item: SpooledFile) -> SpooledFile:
        with self._lock:
            self._files[item.path] = item
            self._bytes += item.size
        return item

    # -- removing (the uploader) --------------------------------------------------------------------------

    def remove(self, item: SpooledFile) -> None:
        """Forget an uploaded and announced (or superseded) file and free its slot."""
        with self._lock:
            if self._files.pop(item.path, None) is None:
                return
            self._bytes -= item.size
        self.slots.release(item.path)

    def remove_session(self, payload_id: str) -> None:
        """Delete a session's directory once none of its files is left."""
        with self._lock:
            if any(item.session.payload_id == payload_id for item in self._files.values()):
                return
        shutil.rmtree(self.directory / payload_id, ignore_errors=True)

    # -- recovery (start) ---------------------------------------------------------------------------------

    def recover(self) -> list[SpooledFile]:
        """The accepted files a previous run left, oldest first; every other slot is freed.

        A session still ``open`` lost its association with the previous run: it is recorded as aborted
        now. A valid slot whose session has no record anymore was released (its session's files were all
        uploaded and the session removed) before the release reached the disk: it is free. A file that is
        no longer readable as DICOM (a damaged disk) is dropped.
        """
        shutil.rmtree(self.incoming, ignore_errors=True)
        self.incoming.mkdir(parents=True, exist_ok=True)
        sessions: dict[str, SessionInfo] = {}
        for path in self.directory.glob(f"*/{SESSION}"):
            session = SessionInfo(**json.loads(path.read_text(encoding="utf-8")))
            if session.state == "open":
                session.state, session.ended_at = "aborted", time.time()
                self.save_session(session)
            sessions[session.payload_id] = session
        recovered: list[SpooledFile] = []
        for path, record in self.slots.scan():
            owner = sessions.get(record.payload_id)
            ids = _identifiers(path, record.length) if owner is not None else None
            if owner is None or ids is None:  # released, or damaged since it was accepted
                self.slots.release(path)
                continue
            item = SpooledFile(path, owner, ids, record.length, path.stat().st_mtime)
            recovered.append(self._track(item))
            self._sequence = max(self._sequence, record.sequence)
        for payload_id in sessions:
            self.remove_session(payload_id)
        for directory in self.directory.iterdir():  # made before its session record was written: none sent
            kept = (self.incoming, self.slots.directory)
            if directory.is_dir() and directory not in kept and not (directory / SESSION).exists():
                shutil.rmtree(directory, ignore_errors=True)
        return recovered


def _identifiers(path: Path, length: int) -> DicomIdentifiers | None:
    try:
        with open_slot(path, length) as stream:
            return read_identifiers(stream)
    except InvalidDicom as exc:  # its CRC matched: the file was accepted so, which a C-STORE check refuses
        log.error("spooled_file_unreadable", slot=str(path), error=str(exc), action="dropped")
        return None
