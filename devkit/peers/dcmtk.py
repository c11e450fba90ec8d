"""dcmtk peers: ``storescp`` (a C-STORE receiver) and ``storescu`` (a C-STORE sender)."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

from devkit.peers._process import (
    LOCALHOST,
    PeerProcess,
    dcmtk_tool,
    free_port,
    peer_env,
    stop_process,
    wait_for_port,
)


class StoreSCP(PeerProcess):
    """dcmtk ``storescp`` receiving C-STOREs on ``port`` into ``directory``.

    Usable as a sync (``with``) or async (``async with``) context manager; the process is listening when the
    block is entered and is stopped when it is left. Options: ``+xa`` (accept all transfer syntaxes),
    ``-aet AET``, ``-od DIRECTORY``, ``-dhl`` (no reverse DNS). With ``refuse=True`` it refuses every
    association (``--refuse``), so senders fail with "association rejected". dcmtk's storescp has no
    bind-address option: it listens on all interfaces, and callers should connect to 127.0.0.1.

    ``bit_preserving`` adds ``+B`` (write data exactly as received); ``extra_args`` go before the port (e.g.
    ``["--fork"]`` to serve several associations at once: by default storescp serves one at a time). Its
    log (``-v`` unless ``verbose=False``) goes to ``log_path`` (default: a temporary file removed on exit),
    see `log`.
    """

    def __init__(
        self,
        directory: Path,
        *,
        aet: str = "STORESCP",
        port: int | None = None,
        refuse: bool = False,
        bit_preserving: bool = False,
        verbose: bool = True,
        extra_args: Sequence[str] = (),
        log_path: Path | None = None,
        startup_timeout: float = 15.0,
    ) -> None:
        self.directory = directory
        self.aet = aet
        self.host = LOCALHOST
        self.port = port if port is not None else free_port()
        self.refuse = refuse
        self.bit_preserving = bit_preserving
        self.verbose = verbose
        self.extra_args = tuple(extra_args)
        self.startup_timeout = startup_timeout
        self._log_path = log_path
        self._own_log_dir: tempfile.TemporaryDirectory[str] | None = None
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def args(self) -> list[str]:
        """The storescp command line."""
        args = [dcmtk_tool("storescp"), "+xa", "-dhl", "-aet", self.aet, "-od", str(self.directory)]
        if self.verbose:
            args.append("-v")
        if self.refuse:
            args.append("--refuse")
        if self.bit_preserving:
            args.append("+B")
        return [*args, *self.extra_args, str(self.port)]

    @property
    def log_path(self) -> Path | None:
        """Where storescp's stdout and stderr go (None before `start`)."""
        return self._log_path

    @property
    def running(self) -> bool:
        """Whether the storescp process is alive."""
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        """Start storescp and wait until it accepts connections."""
        if self._process is not None:
            raise RuntimeError("StoreSCP already started")
        args = self.args  # resolves the binary first: a missing dcmtk fails before anything is created
        self.directory.mkdir(parents=True, exist_ok=True)
        if self._log_path is None:
            self._own_log_dir = tempfile.TemporaryDirectory(prefix="mwm-storescp-")
            self._log_path = Path(self._own_log_dir.name) / "storescp.log"
        with self._log_path.open("ab") as log:
            self._process = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=peer_env()
            )
        try:
            wait_for_port(
                self.host,
                self.port,
                timeout=self.startup_timeout,
                process=self._process,
                log_path=self._log_path,
            )
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop storescp (SIGTERM, then SIGKILL) and remove the temporary log, if it created one."""
        if self._process is not None:
            stop_process(self._process)
            self._process = None
        if self._own_log_dir is not None:
            self._own_log_dir.cleanup()
            self._own_log_dir = None
            self._log_path = None

    def pause(self) -> None:
        """Freeze storescp (SIGSTOP): connections stay open, nothing is answered (a hung destination)."""
        assert self._process is not None, "StoreSCP not started"
        self._process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """Let a paused storescp go on (SIGCONT)."""
        assert self._process is not None, "StoreSCP not started"
        self._process.send_signal(signal.SIGCONT)

    def log(self) -> str:
        """storescp's log so far."""
        if self._log_path is None or not self._log_path.exists():
            return ""
        return self._log_path.read_text(errors="replace")

    def received_files(self) -> list[Path]:
        """The files received so far, sorted by path."""
        if not self.directory.exists():
            return []
        return sorted(p for p in self.directory.rglob("*") if p.is_file())

    def wait_for_files(self, count: int, timeout: float = 30.0) -> list[Path]:
        """Block until at least ``count`` files have arrived; return them. Raises `TimeoutError`."""
        deadline = time.monotonic() + timeout
        while True:
            files = self.received_files()
            if len(files) >= count:
                return files
            if time.monotonic() > deadline:
                raise TimeoutError(f"storescp received {len(files)} of {count} files in {timeout} s")
            time.sleep(0.05)

    async def await_files(self, count: int, timeout: float = 30.0) -> list[Path]:
        """`wait_for_files` for async code (cancellation-safe, so ``asyncio.timeout`` works as well)."""
        deadline = time.monotonic() + timeout
        while True:
            files = await asyncio.to_thread(self.received_files)
            if len(files) >= count:
                return files
            if time.monotonic() > deadline:
                raise TimeoutError(f"storescp received {len(files)} of {count} files in {timeout} s")
            await asyncio.sleep(0.05)

    async def __aenter__(self) -> Self:
        await asyncio.to_thread(self.start)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await asyncio.to_thread(self.stop)


def storescu_args(
    host: str,
    port: int,
    called_aet: str,
    files_or_dir: Path | Sequence[Path],
    *,
    calling_aet: str = "STORESCU",
    extra_args: Sequence[str] = (),
) -> list[str]:
    """The dcmtk storescu command line: directories are scanned recursively (``+sd +r``)."""
    paths = [files_or_dir] if isinstance(files_or_dir, Path) else list(files_or_dir)
    if not paths:
        raise ValueError("storescu needs at least one file or directory")
    args = [dcmtk_tool("storescu"), "-aet", calling_aet, "-aec", called_aet, "-to", "10"]
    if any(p.is_dir() for p in paths):
        args += ["+sd", "+r"]
    return [*args, *extra_args, host, str(port), *(str(p) for p in paths)]


def storescu(
    host: str,
    port: int,
    called_aet: str,
    files_or_dir: Path | Sequence[Path],
    *,
    calling_aet: str = "STORESCU",
    timeout: float = 120.0,
    extra_args: Sequence[str] = (),
    check: bool = False,
) -> subprocess.CompletedProcess[str]:
    """Send files (or whole directories) with dcmtk storescu, ``TCP_NODELAY=1``; return the finished process.

    storescu exits non-zero when the association is rejected or a store fails; with ``check=True`` that
    raises `subprocess.CalledProcessError`. Raises `subprocess.TimeoutExpired` after ``timeout`` seconds.
    """
    args = storescu_args(host, port, called_aet, files_or_dir, calling_aet=calling_aet, extra_args=extra_args)
    return subprocess.run(
        args,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=peer_env(),
        check=check,
        stdin=subprocess.DEVNULL,
    )


async def astorescu(
    host: str,
    port: int,
    called_aet: str,
    files_or_dir: Path | Sequence[Path],
    *,
    calling_aet: str = "STORESCU",
    timeout: float = 120.0,
    extra_args: Sequence[str] = (),
    check: bool = False,
) -> subprocess.CompletedProcess[str]:
    """`storescu` without blocking the event loop (``asyncio.create_subprocess_exec``).

    Raises `TimeoutError` (after killing storescu) when it runs longer than ``timeout`` seconds.
    """
    args = storescu_args(host, port, called_aet, files_or_dir, calling_aet=calling_aet, extra_args=extra_args)
    process = await asyncio.create_subprocess_exec(
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=peer_env(),
    )
    try:
        async with asyncio.timeout(timeout):
            out, err = await process.communicate()
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()
        raise
    assert process.returncode is not None
    result = subprocess.CompletedProcess(
        args, process.returncode, out.decode(errors="replace"), err.decode(errors="replace")
    )
    if check:
        result.check_returncode()
    return result
