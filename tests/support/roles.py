"""Run an MWM role the way a container runtime would (argv, environment, ports) and probe it like a kubelet.

`RoleSpec` is what a pod template or a compose service gives a container: the argv, the environment, the
container ports (by name) and the probes. `started_role` runs it here as a child process, with every port
moved to a free local one (each environment value naming a container port is rewritten to the local port,
so a process that binds where its settings say is reached where its probes look) and each mount path
that appears in the environment moved to a directory named after its volume (roles that mount the same
volume share it). Its stdout and stderr go to one log file.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

BIN = Path(sys.executable).parent


@dataclass(frozen=True)
class Probe:
    """An ``httpGet`` probe with the kubelet's timing fields."""

    path: str
    port: str | int
    initial_delay_s: float = 0
    period_s: float = 10
    timeout_s: float = 1
    failure_threshold: int = 3

    @classmethod
    def from_manifest(cls, probe: Mapping[str, Any]) -> Probe:
        get = probe["httpGet"]
        return cls(
            path=get["path"],
            port=get["port"],
            initial_delay_s=probe.get("initialDelaySeconds", 0),
            period_s=probe.get("periodSeconds", 10),
            timeout_s=probe.get("timeoutSeconds", 1),
            failure_threshold=probe.get("failureThreshold", 3),
        )

    @property
    def restart_after_s(self) -> float:
        """How long after start a liveness probe that never succeeds makes the kubelet restart the pod."""
        return self.initial_delay_s + self.period_s * self.failure_threshold


@dataclass
class RoleSpec:
    """One container of a workload: what to run and how it is probed."""

    name: str
    argv: list[str]
    env: dict[str, str]
    ports: dict[str, int]  # container port name -> number
    liveness: Probe | None = None
    readiness: Probe | None = None
    mounts: dict[str, str] = field(default_factory=dict)  # mount path -> volume (shared by that name)
    grace_period_s: float = 30


@dataclass
class RunningRole:
    spec: RoleSpec
    process: subprocess.Popen[bytes]
    log: Path
    local_ports: dict[int, int]  # container port -> local port
    env: dict[str, str]  # the environment it runs with (ports and mounts moved)

    def url(self, port: str | int, path: str) -> str:
        number = self.spec.ports[port] if isinstance(port, str) else port
        return f"http://127.0.0.1:{self.local_ports[number]}{path}"

    def probe(self, probe: Probe) -> tuple[bool, str]:
        """One probe as the kubelet makes it: success is a 2xx or 3xx answer within the timeout."""
        try:
            answer = httpx.get(self.url(probe.port, probe.path), timeout=probe.timeout_s)
        except (httpx.HTTPError, KeyError) as exc:
            return False, f"{type(exc).__name__}: {exc}"
        return 200 <= answer.status_code < 400, f"{answer.status_code} {answer.text[:200]}"

    def wait_until(self, probe: Probe, within_s: float) -> str:
        """Probe until success; AssertionError (with the log) after ``within_s`` or if the process ends."""
        deadline = time.monotonic() + within_s
        last = "never probed"
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"{self.spec.name} exited ({self.process.returncode}):\n{self.tail()}")
            ok, last = self.probe(probe)
            if ok:
                return last
            time.sleep(0.5)
        raise AssertionError(
            f"{self.spec.name}: {probe.path} on port {probe.port} failed for {within_s:.0f}s (last: {last})\n"
            + self.tail()
        )

    def metrics(self) -> str:
        return httpx.get(self.url("observability", "/metrics"), timeout=10).text

    def terminate(self) -> int:
        """SIGTERM, as the kubelet sends it; the exit code (killed after the grace period: -9)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=self.spec.grace_period_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def resolve_command(argv: list[str]) -> list[str]:
    """The image's executables (``mwm``, ``python``) are this virtual environment's."""
    first = BIN / argv[0]
    return [str(first) if first.exists() else argv[0], *argv[1:]]


@contextmanager
def started_role(
    spec: RoleSpec, scratch: Path, extra_env: Mapping[str, str] | None = None
) -> Iterator[RunningRole]:
    """Start the role (ports and mounts moved: see the module docstring); SIGKILL it if left running."""
    local_ports = {number: free_port() for number in spec.ports.values()}
    mounts = {path: scratch / "volumes" / volume for path, volume in spec.mounts.items()}
    for directory in mounts.values():
        directory.mkdir(parents=True, exist_ok=True)
    env = {key: value for key, value in os.environ.items() if not key.startswith("MWM_")}
    for key, value in spec.env.items():
        if value.isdigit() and int(value) in local_ports:
            value = str(local_ports[int(value)])
        env[key] = str(mounts.get(value, value))
    env.update(extra_env or {})
    env["PYTHONUNBUFFERED"] = "1"
    log = scratch / f"{spec.name}.log"
    with log.open("wb") as out:
        process = subprocess.Popen(resolve_command(spec.argv), env=env, stdout=out, stderr=subprocess.STDOUT)
    running = RunningRole(spec, process, log, local_ports, env)
    try:
        yield running
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
