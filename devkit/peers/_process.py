"""Finding, starting, waiting for and stopping peer processes."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from abc import ABC, abstractmethod
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Self

LOCALHOST = "127.0.0.1"
_DCMTK_DIRS = ("/usr/bin", "/usr/local/bin")
_ORTHANC_CANDIDATES = ("/usr/sbin/Orthanc", "/usr/bin/Orthanc", "/usr/local/bin/Orthanc")
_STOP_TIMEOUT = 15.0


class PeerUnavailableError(RuntimeError):
    """A peer's executable is not installed."""


class PeerStartError(RuntimeError):
    """A peer process exited or did not become ready in time; the message carries the tail of its log."""


class PeerProcess(ABC):
    """A peer run as a child process: a ``with`` block starts it and stops it however the block ends."""

    @abstractmethod
    def start(self) -> None:
        """Start the process and return once it serves."""

    @abstractmethod
    def stop(self) -> None:
        """Stop the process (idempotent)."""

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def peer_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The current environment plus ``TCP_NODELAY=1`` (and ``extra``), for dcmtk and Orthanc processes."""
    env = dict(os.environ)
    env["TCP_NODELAY"] = "1"
    if extra:
        env.update(extra)
    return env


def _is_native_executable(path: Path) -> bool:
    try:
        with path.open("rb") as fh:
            return fh.read(4) == b"\x7fELF" and os.access(path, os.X_OK)
    except OSError:
        return False


def dcmtk_tool(name: str) -> str:
    """Absolute path of the dcmtk executable ``name`` (e.g. ``storescp``).

    ``$MWM_DCMTK_BIN`` (a directory) wins, then /usr/bin and /usr/local/bin, then ``$PATH``. Only native
    executables count: pynetdicom installs Python scripts with the same names (``storescp``, ``storescu``)
    into virtualenvs, which must not be mistaken for dcmtk.
    """
    dirs = [d for d in (os.environ.get("MWM_DCMTK_BIN", ""), *_DCMTK_DIRS) if d]
    dirs += [d for d in os.environ.get("PATH", "").split(os.pathsep) if d]
    for directory in dirs:
        candidate = Path(directory) / name
        if _is_native_executable(candidate):
            return str(candidate)
    raise PeerUnavailableError(
        f"dcmtk tool {name!r} not found (looked in $MWM_DCMTK_BIN, {', '.join(_DCMTK_DIRS)} and $PATH); "
        "install it with: apt-get install -y dcmtk"
    )


def orthanc_binary() -> str:
    """Absolute path of the Orthanc server executable (Debian installs it as /usr/sbin/Orthanc)."""
    override = os.environ.get("MWM_ORTHANC_BIN")
    for candidate in ([override] if override else []) + list(_ORTHANC_CANDIDATES):
        if _is_native_executable(Path(candidate)):
            return candidate
    found = shutil.which("Orthanc")
    if found:
        return found
    raise PeerUnavailableError(
        "Orthanc not found (looked at $MWM_ORTHANC_BIN, " + ", ".join(_ORTHANC_CANDIDATES) + " and $PATH); "
        "install it with: apt-get install -y orthanc"
    )


def free_port(host: str = LOCALHOST) -> int:
    """A TCP port that was free on ``host`` a moment ago (the OS picks it; racy, like every such helper)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def log_tail(path: Path | None, limit: int = 4000) -> str:
    if path is None or not path.exists():
        return "(no log)"
    text = path.read_text(errors="replace")
    return text[-limit:] if text else "(log is empty)"


def wait_for_port(
    host: str,
    port: int,
    *,
    timeout: float = 15.0,
    process: subprocess.Popen[bytes] | None = None,
    log_path: Path | None = None,
) -> None:
    """Block until ``host:port`` accepts TCP connections; raise `PeerStartError` if ``process`` dies first."""
    deadline = time.monotonic() + timeout
    while True:
        if process is not None and process.poll() is not None:
            raise PeerStartError(
                f"{process.args!r} exited with {process.returncode} before listening on {host}:{port}:\n"
                + log_tail(log_path)
            )
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise PeerStartError(
                    f"nothing listening on {host}:{port} after {timeout:.0f} s:\n" + log_tail(log_path)
                ) from None
            time.sleep(0.02)


def stop_process(process: subprocess.Popen[bytes], timeout: float = _STOP_TIMEOUT) -> None:
    """SIGTERM ``process``, then SIGKILL it if it has not exited after ``timeout`` seconds."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout)
