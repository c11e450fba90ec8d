"""The gateway's spool: received files made durable on the gateway's own disk before the C-STORE response.

Layout under ``gateway.spool_dir`` (one volume, so a rename is atomic and copies nothing)::

    incoming/                  pynetdicom's chunked receive writes each data set here as it arrives
    <payload id>/session.json  the association: AE titles, peer, state (open | complete | aborted)
    <payload id>/<n>.dcm       an accepted file, fsynced, then renamed here, then the directory fsynced

A file is accepted (`Spool.accept`) only once its bytes and its directory entry are on disk, so a success
response is never sent for a file a power cut could lose. The uploader removes it (`Spool.remove`) once it
is in the object store and announced. `Spool.recover` lists what a previous run left: accepted files per
session; the files of ``incoming/`` (data sets whose response was never sent) are deleted, since their
sender did not get a success and sends them again.

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
from pathlib import Path
from typing import Literal

from schemas.events import DicomIdentifiers
from wm.dicom import InvalidDicom, read_identifiers

__all__ = ["SessionInfo", "Spool", "SpooledFile"]

State = Literal["open", "complete", "aborted"]
SESSION = "session.json"
INCOMING = "incoming"


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
        _fsync_directory(directory)
        if created:
            _fsync_directory(self.directory)

    def accept(self, received: Path, session: SessionInfo, ids: DicomIdentifiers) -> SpooledFile:
        """Make the received file durable in the session's directory; the caller may then answer success."""
        with open(received, "rb") as stream:
            os.fdatasync(stream.fileno())  # every fragment was flushed to the kernel as it arrived
        with self._lock:
            self._sequence += 1
            target = self.directory / session.payload_id / f"{self._sequence:08d}-{ids.sop_instance_uid}.dcm"
        os.replace(received, target)
        _fsync_directory(target.parent)
        return self._track(SpooledFile(target, session, ids, target.stat().st_size))

    def _track(self, item: SpooledFile) -> SpooledFile:
        with self._lock:
            self._files[item.path] = item
            self._bytes += item.size
        return item

    # -- removing (the uploader) --------------------------------------------------------------------------

    def remove(self, item: SpooledFile) -> None:
        """Forget and delete an uploaded and announced (or superseded) file."""
        with self._lock:
            if self._files.pop(item.path, None) is not None:
                self._bytes -= item.size
        item.path.unlink(missing_ok=True)

    def remove_session(self, payload_id: str) -> None:
        """Delete a session's directory once none of its files is left."""
        directory = self.directory / payload_id
        if not any(directory.glob("*.dcm")):
            shutil.rmtree(directory, ignore_errors=True)

    # -- recovery (start) ---------------------------------------------------------------------------------

    def recover(self) -> list[SpooledFile]:
        """The accepted files a previous run left, oldest session first; clears ``incoming/``.

        A session still ``open`` lost its association with the previous run: it is recorded as aborted
        now. A file that is no longer readable as DICOM (a damaged disk) is deleted.
        """
        shutil.rmtree(self.incoming, ignore_errors=True)
        self.incoming.mkdir(parents=True, exist_ok=True)
        recovered: list[SpooledFile] = []
        sessions = [path.parent for path in self.directory.glob(f"*/{SESSION}")]
        for directory in sorted(sessions, key=lambda path: path.stat().st_mtime):
            session = SessionInfo(**json.loads((directory / SESSION).read_text(encoding="utf-8")))
            if session.state == "open":
                session.state, session.ended_at = "aborted", time.time()
                self.save_session(session)
            for path in sorted(directory.glob("*.dcm")):
                try:
                    ids = read_identifiers(path)
                except InvalidDicom:
                    path.unlink()
                    continue
                stat = path.stat()
                recovered.append(self._track(SpooledFile(path, session, ids, stat.st_size, stat.st_mtime)))
            self.remove_session(session.payload_id)
        for directory in self.directory.iterdir():  # files renamed in before their session record: none sent
            if directory.is_dir() and directory != self.incoming and not (directory / SESSION).exists():
                shutil.rmtree(directory, ignore_errors=True)
        return recovered


def _fsync_directory(directory: Path) -> None:
    """Make a rename or a new entry in ``directory`` durable."""
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
