"""Orthanc 1.10 (Debian) with a throw-away configuration, driven through its REST API."""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx

from devkit.peers._process import (
    LOCALHOST,
    PeerProcess,
    PeerStartError,
    free_port,
    log_tail,
    orthanc_binary,
    peer_env,
    stop_process,
    wait_for_port,
)


class Orthanc(PeerProcess):
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
                    + log_tail(self.log_path)
                )
            try:
                if self._client.get("/system", timeout=2.0).status_code == 200:
                    wait_for_port(self.host, self.dicom_port, timeout=5.0, process=self._process)
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise PeerStartError(
                    f"Orthanc not ready after {self.startup_timeout:.0f} s:\n" + log_tail(self.log_path)
                )
            time.sleep(0.05)

    def stop(self) -> None:
        """Stop Orthanc (SIGTERM, a clean shutdown; SIGKILL after 30 s) and remove a temporary workdir."""
        if self._client is not None:
            self._client.close()
            self._client = None
        if self._process is not None:
            stop_process(self._process, timeout=30.0)
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
        return log_tail(self.log_path, limit=10**9)

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
