"""The stack the BDD scenarios drive: the real ``mwm`` processes, CLI, gateway and DICOM peers."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from devkit.peers import LOCALHOST, StoreSCP, free_port, wait_for_port
from devkit.services import REPO, cleanup, settings_env
from tests.support.api import api_settings
from tests.support.services import require_services
from wm.config import Settings


@dataclass
class Stack:
    """MWM as a user runs it: processes started with the ``mwm`` command, driven by the CLI."""

    settings: Settings
    work: Path
    gateway_port: int
    env: dict[str, str]
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    receivers: dict[str, tuple[StoreSCP, int]] = field(default_factory=dict)
    context: dict[str, Any] = field(default_factory=dict)

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run ``mwm ARGS`` and return its result (fails the test on a non-zero exit when ``check``)."""
        result = subprocess.run(
            [sys.executable, "-m", "wm", *args],
            env=self.env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if check:
            assert result.returncode == 0, f"mwm {' '.join(args)} exited {result.returncode}: {result.stderr}"
        return result

    def cli_json(self, *args: str) -> Any:
        """The ``--output json`` answer of ``mwm ARGS``."""
        return json.loads(self.cli(*args, "--output", "json").stdout)

    def start(self, name: str, *args: str) -> None:
        """Start ``mwm ARGS`` in the background, its output in ``<work>/<name>.log``."""
        with (self.work / f"{name}.log").open("wb") as log:
            self.processes.append(
                subprocess.Popen(
                    [sys.executable, "-m", "wm", *args],
                    env=self.env,
                    cwd=REPO,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )

    def receiver(self, ae_title: str) -> int:
        """A dcmtk storescp answering ``ae_title``; returns its port."""
        if ae_title not in self.receivers:
            port = free_port()
            scp = StoreSCP(self.work / ae_title, aet=ae_title, port=port, verbose=False)
            scp.start()
            self.receivers[ae_title] = (scp, port)
        return self.receivers[ae_title][1]

    def run_async(self, coroutine: Any) -> Any:
        """Run a coroutine of the async test helpers from a (synchronous) step."""
        return asyncio.run(coroutine)

    def stop(self) -> None:
        """Stop every process and receiver the scenario started."""
        for process in self.processes:
            process.terminate()
        for process in self.processes:
            try:
                process.wait(timeout=40)
            except subprocess.TimeoutExpired:
                process.kill()
        for scp, _ in self.receivers.values():
            scp.stop()


def eventually(check: Callable[[], bool], timeout: float, what: str, interval: float = 0.5) -> None:
    """Poll ``check`` until true; fail with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


@pytest.fixture
def stack(settings: Settings, tmp_path: Path) -> Iterator[Stack]:
    """A fresh MWM (own exchange, database, bucket) with its API running; the rest is up to the steps."""
    require_services(settings)
    settings = api_settings(settings, free_port())
    gateway_port = free_port()
    env = {**settings_env(settings), "MWM_GATEWAY__PORT": str(gateway_port)}
    built = Stack(settings, tmp_path, gateway_port, env)
    try:
        built.start("api", "api")
        eventually(lambda: _healthy(settings), 60, "the API to answer /health")
        built.cli("topology", "declare")
        yield built
    finally:
        built.stop()
        asyncio.run(cleanup(settings))


def _healthy(settings: Settings) -> bool:
    try:
        return httpx.get(f"{settings.api.url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def start_mwm(stack: Stack) -> None:
    """Every consumer in one process, and the DICOM gateway."""
    stack.start("consumers", "run")
    stack.start("gateway", "gateway")
    wait_for_port(LOCALHOST, stack.gateway_port, timeout=60.0)
