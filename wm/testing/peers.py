"""Real DICOM peers as subprocesses, for integration tests, the demo and benchmarks.

* `StoreSCP` runs dcmtk ``storescp`` (a C-STORE receiver writing files into a directory);
* `storescu` / `astorescu` run dcmtk ``storescu`` (a C-STORE sender);
* `Orthanc` runs Debian's Orthanc 1.10 with a throw-away configuration and talks to its REST API.

None of these peers were written by this project, which is the point: they check our DICOM code against
independent implementations. Every process gets ``TCP_NODELAY=1`` in its environment (dcmtk, also inside
Orthanc, reads it); without it each C-STORE waits on a 40 ms delayed ACK.

Missing binaries raise `PeerUnavailableError` (install the Debian packages ``dcmtk`` and ``orthanc``);
tests must let it fail rather than skip.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import httpx

__all__ = [
    "LOCALHOST",
    "Orthanc",
    "PeerStartError",
    "PeerUnavailableError",
    "StoreSCP",
    "astorescu",
    "dcmtk_tool",
    "free_port",
    "orthanc_binary",
    "peer_env",
    "storescu",
    "storescu_args",
    "wait_for_port",
]

LOCALHOST = "127.0.0.1"
_DCMTK_DIRS = ("/usr/bin", "/usr/local/bin")
_ORTHANC_CANDIDATES = ("/usr/sbin/Orthanc", "/usr/bin/Orthanc", "/usr/local/bin/Orthanc")
_STOP_TIMEOUT = 15.0


class PeerUnavailableError(RuntimeError):
    """A peer's executable is not installed."""


class PeerStartError(RuntimeError):
    """A peer process exited or did not become ready in time; the message carries the tail of its log."""


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


def _log_tail(path: Path | None, limit: int = 4000) -> str:
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
                + _log_tail(log_path)
            )
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise PeerStartError(
                    f"nothing listening on {host}:{port} after {timeout:.0f} s:\n" + _log_tail(log_path)
                ) from None
            time.sleep(0.02)


def _stop_process(process: subprocess.Popen[bytes], timeout: float = _STOP_TIMEOUT) -> None:
    """SIGTERM ``process``, then SIGKILL it if it has not exited after ``timeout`` seconds."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout)


class StoreSCP:
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
            _stop_process(self._process)
            self._process = None
        if self._own_log_dir is not None:
            self._own_log_dir.cleanup()
            self._own_log_dir = None
            self._log_path = None

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

    async def await_files(self, count: int, timeout: float = 30.0) -> list[Path]:  # noqa: ASYNC109
        """`wait_for_files` for async code (cancellation-safe, so ``asyncio.timeout`` works as well)."""
        deadline = time.monotonic() + timeout
        while True:
            files = await asyncio.to_thread(self.received_files)
            if len(files) >= count:
                return files
            if time.monotonic() > deadline:
                raise TimeoutError(f"storescp received {len(files)} of {count} files in {timeout} s")
            await asyncio.sleep(0.05)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

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
    timeout: float = 120.0,  # noqa: ASYNC109 - same signature as storescu; cancellation also kills it
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


class Orthanc:
    """Debian's Orthanc 1.10 on loopback with a generated configuration in a temporary directory.

    HTTP on ``127.0.0.1:http_port`` (no authentication, remote access off), DICOM on ``dicom_port`` with AE
    title ``aet``, storage and index in ``workdir``, no plugins, every store accepted, no called-AET check,
    no fsync per file and no association close delay (it would keep a single-process storescp busy for
    5 s after every export). ``modalities`` maps a name to ``(AET, host, port)``; more can be added at run
    time with `set_modality`. ``extra_config`` is merged over the generated configuration.

    Sync context manager; the REST API is ready when the block is entered. Orthanc's stdout and stderr go to
    ``workdir/orthanc.log``. ``workdir`` defaults to a temporary directory, removed on exit unless
    ``keep_workdir``.
    """

    def __init__(
        self,
        *,
        aet: str = "ORTHANC",
        modalities: Mapping[str, tuple[str, str, int]] | None = None,
        workdir: Path | None = None,
        keep_workdir: bool = False,
        extra_config: Mapping[str, Any] | None = None,
        startup_timeout: float = 60.0,
        request_timeout: float = 120.0,
    ) -> None:
        self.aet = aet
        self.modalities = dict(modalities or {})
        self.http_port = free_port()
        self.dicom_port = free_port()
        while self.dicom_port == self.http_port:
            self.dicom_port = free_port()
        self.host = LOCALHOST
        self.url = f"http://{LOCALHOST}:{self.http_port}"
        self.keep_workdir = keep_workdir
        self.extra_config = dict(extra_config or {})
        self.startup_timeout = startup_timeout
        self.request_timeout = request_timeout
        self._given_workdir = workdir
        self._tmp: Path | None = None
        self._workdir: Path | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._client: httpx.Client | None = None

    # -- lifecycle ---------------------------------------------------------------------------------------

    @property
    def workdir(self) -> Path:
        """The directory holding the configuration, storage, index and log (only while running)."""
        if self._workdir is None:
            raise RuntimeError("Orthanc is not started")
        return self._workdir

    @property
    def log_path(self) -> Path:
        """Orthanc's log file."""
        return self.workdir / "orthanc.log"

    def config(self) -> dict[str, Any]:
        """The configuration Orthanc is (or will be) started with."""
        workdir = self.workdir
        config: dict[str, Any] = {
            "Name": f"mwm-test-{self.aet}",
            "StorageDirectory": str(workdir / "storage"),
            "IndexDirectory": str(workdir / "index"),
            "Plugins": [],
            "HttpServerEnabled": True,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "HttpCompressionEnabled": False,
            "OrthancExplorerEnabled": False,
            "WebDavEnabled": False,
            "DicomServerEnabled": True,
            "DicomAet": self.aet,
            "DicomPort": self.dicom_port,
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowEcho": True,
            "DicomModalities": {name: list(spec) for name, spec in self.modalities.items()},
            "DicomModalitiesInDatabase": False,
            "DicomAssociationCloseDelay": 0,
            "SyncStorageArea": False,
            "SaveJobs": False,
            "TcpNoDelay": True,
            "LuaScripts": [],
        }
        config.update(self.extra_config)
        return config

    def start(self) -> None:
        """Write the configuration, start Orthanc and wait until ``GET /system`` answers."""
        if self._process is not None:
            raise RuntimeError("Orthanc already started")
        binary = orthanc_binary()
        if self._given_workdir is not None:
            self._workdir = self._given_workdir
            self._workdir.mkdir(parents=True, exist_ok=True)
        else:
            self._tmp = Path(tempfile.mkdtemp(prefix="mwm-orthanc-"))
            self._workdir = self._tmp
        config_path = self._workdir / "orthanc.json"
        config_path.write_text(json.dumps(self.config(), indent=2))
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                [binary, "--no-jobs", str(config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=peer_env(),
                cwd=self._workdir,
            )
        self._client = httpx.Client(base_url=self.url, timeout=self.request_timeout, trust_env=False)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self) -> None:
        assert self._process is not None and self._client is not None
        deadline = time.monotonic() + self.startup_timeout
        while True:
            if self._process.poll() is not None:
                raise PeerStartError(
                    f"Orthanc exited with {self._process.returncode} during startup:\n"
                    + _log_tail(self.log_path)
                )
            try:
                if self._client.get("/system", timeout=2.0).status_code == 200:
                    wait_for_port(self.host, self.dicom_port, timeout=5.0, process=self._process)
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise PeerStartError(
                    f"Orthanc not ready after {self.startup_timeout:.0f} s:\n" + _log_tail(self.log_path)
                )
            time.sleep(0.05)

    def stop(self) -> None:
        """Stop Orthanc (SIGTERM, a clean shutdown; SIGKILL after 30 s) and remove a temporary workdir."""
        if self._client is not None:
            self._client.close()
            self._client = None
        if self._process is not None:
            _stop_process(self._process, timeout=30.0)
            self._process = None
        if self._tmp is not None and not self.keep_workdir:
            shutil.rmtree(self._tmp, ignore_errors=True)
        self._tmp = None
        self._workdir = None

    @property
    def returncode(self) -> int | None:
        """The process's exit status once it has exited, else None."""
        return None if self._process is None else self._process.poll()

    def log(self) -> str:
        """Orthanc's log so far."""
        return _log_tail(self.log_path, limit=10**9)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- REST API ----------------------------------------------------------------------------------------

    @property
    def client(self) -> httpx.Client:
        """The httpx client bound to Orthanc's REST API."""
        if self._client is None:
            raise RuntimeError("Orthanc is not started")
        return self._client

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self.client.request(method, path, **kwargs)
        if response.is_error:
            raise httpx.HTTPStatusError(
                f"Orthanc {method} {path} -> {response.status_code}: {response.text[:1000]}",
                request=response.request,
                response=response,
            )
        return response.json() if response.content else None

    def system(self) -> dict[str, Any]:
        """``GET /system``: version, AET, ports."""
        result: dict[str, Any] = self._json("GET", "/system")
        return result

    def instances(self) -> list[str]:
        """Orthanc identifiers of every stored instance."""
        result: list[str] = self._json("GET", "/instances")
        return result

    def studies(self) -> list[str]:
        """Orthanc identifiers of every stored study."""
        result: list[str] = self._json("GET", "/studies")
        return result

    def instance_count(self) -> int:
        """How many instances are stored (``GET /statistics``)."""
        return int(self._json("GET", "/statistics")["CountInstances"])

    def instance_tags(self, instance_id: str) -> dict[str, Any]:
        """``GET /instances/{id}/simplified-tags``: keyword -> value."""
        result: dict[str, Any] = self._json("GET", f"/instances/{instance_id}/simplified-tags")
        return result

    def get_file(self, instance_id: str) -> bytes:
        """The stored DICOM file of an instance (``GET /instances/{id}/file``)."""
        response = self.client.get(f"/instances/{instance_id}/file")
        response.raise_for_status()
        return response.content

    def upload(self, path: Path) -> dict[str, Any]:
        """Store one DICOM file through ``POST /instances``; returns Orthanc's answer (ID, Status, ...)."""
        result: dict[str, Any] = self._json(
            "POST", "/instances", content=path.read_bytes(), headers={"Content-Type": "application/dicom"}
        )
        return result

    def set_modality(self, name: str, aet: str, host: str, port: int) -> None:
        """Declare (or replace) a DICOM modality at run time (``PUT /modalities/{name}``)."""
        self._json("PUT", f"/modalities/{name}", json={"AET": aet, "Host": host, "Port": port})

    def modality_names(self) -> list[str]:
        """Names of the declared modalities."""
        result: list[str] = self._json("GET", "/modalities")
        return result

    def echo(self, modality: str) -> bool:
        """C-ECHO a modality; True when it answered."""
        return self.client.post(f"/modalities/{modality}/echo", json={}).status_code == 200

    def store_to_modality(
        self, modality: str, resources: Sequence[str], *, synchronous: bool = True
    ) -> dict[str, Any]:
        """C-STORE resources (instance, series, study or patient ids) to a modality (``POST .../store``).

        Synchronous: returns when the export is done, with Orthanc's summary (``InstancesCount``,
        ``FailedInstancesCount``, ...); raises `httpx.HTTPStatusError` when the export failed. Asynchronous:
        returns the job (``ID``, ``Path``), see `wait_job`.
        """
        body = {"Resources": list(resources), "Synchronous": synchronous}
        result: dict[str, Any] = self._json("POST", f"/modalities/{modality}/store", json=body)
        return result

    def wait_job(self, job_id: str, timeout: float = 120.0) -> dict[str, Any]:
        """Poll ``GET /jobs/{id}`` until the job succeeds (return it) or fails (raise `RuntimeError`)."""
        deadline = time.monotonic() + timeout
        while True:
            job: dict[str, Any] = self._json("GET", f"/jobs/{job_id}")
            if job.get("State") == "Success":
                return job
            if job.get("State") == "Failure":
                raise RuntimeError(f"Orthanc job {job_id} failed: {job}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"Orthanc job {job_id} not done after {timeout} s: {job}")
            time.sleep(0.05)

    def delete_all(self) -> None:
        """Delete every stored patient (and with them all studies, series and instances)."""
        patients: list[str] = self._json("GET", "/patients")
        for patient in patients:
            self._json("DELETE", f"/patients/{patient}")
