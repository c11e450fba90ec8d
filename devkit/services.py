"""Access to the real services for tests, benchmarks and the demo: per-run names, clean-up, fault injection,
consumer processes, waiting without sleeps."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import aio_pika
from pydantic import BaseModel

from wm.adapters.mongo import Database
from wm.adapters.objectstore import ObjectStore
from wm.config import Settings

REPO = Path(__file__).resolve().parents[1]


def unique_settings(work_dir: Path, **overrides: Any) -> Settings:
    """Settings with this test's own exchange, queues, database and bucket (env overrides still apply)."""
    run = uuid.uuid4().hex[:10]
    base = Settings()
    sections: dict[str, BaseModel] = {
        "bus": base.bus.model_copy(
            update={
                "exchange": f"mwm-t-{run}",
                "dead_letter_exchange": f"mwm-t-{run}.dlx",
                "queue_prefix": f"t-{run}",
            }
        ),
        "mongo": base.mongo.model_copy(update={"database": f"mwm_t_{run}", "timeout_ms": 2000}),
        "object_store": base.object_store.model_copy(update={"bucket": f"mwm-t-{run}"}),
        "retry": base.retry.model_copy(update={"attempts": 4, "initial_delay_s": 0.05, "max_delay_s": 0.5}),
        "observability": base.observability.model_copy(update={"http_port": 0, "drain_timeout_s": 15.0}),
        # A few reusable spool files, not 256 MiB written by every gateway a test starts.
        "gateway": base.gateway.model_copy(update={"spool_preallocated_files": 4}),
    }
    for section, values in overrides.items():
        sections[section] = getattr(base, section).model_copy(update=values)
    return base.model_copy(update={**sections, "work_dir": str(work_dir)})


def settings_env(settings: Settings) -> dict[str, str]:
    """The environment that makes a child process build exactly these settings."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("MWM_")}
    for section, value in settings:
        if isinstance(value, BaseModel):
            for name, field_value in value:
                env[f"MWM_{section.upper()}__{name.upper()}"] = str(field_value)
        else:
            env[f"MWM_{section.upper()}"] = str(value)
    env["PYTHONPATH"] = str(REPO)
    return env


def reachable(host: str, port: int) -> bool:
    """Whether a TCP connect to host:port succeeds."""
    with socket.socket() as sock:
        sock.settimeout(1.0)
        return sock.connect_ex((host, port)) == 0


def service_endpoints(settings: Settings) -> Mapping[str, tuple[str, int]]:
    """host and port of RabbitMQ, the MongoDB-wire server and the S3 server."""
    bus, mongo = urlparse(settings.bus.url), urlparse(settings.mongo.url.split(",")[0])
    s3_host, _, s3_port = settings.object_store.endpoint.partition(":")
    return {
        "RabbitMQ": (bus.hostname or "127.0.0.1", bus.port or 5672),
        "MongoDB-wire server": (mongo.hostname or "127.0.0.1", mongo.port or 27017),
        "S3 server": (s3_host, int(s3_port or 443)),
    }


async def wait_for(
    check: Callable[[], Awaitable[bool]], timeout: float, what: str, interval: float = 0.05
) -> None:
    """Poll ``check`` until it is true; fail the test with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)


def services_command(*args: str) -> None:
    """Run ``scripts/services`` (fault injection: stop/start a service).

    It gets this process's environment, so ``MWM_SERVICES_PORT_OFFSET`` (and the ``MWM_*`` URLs) select
    the same stack the test talks to. Never on the shared stack (no offset): others' runs use it, so the
    tests that stop services are the fault suite's, on a stack of its own (``scripts/faults``).
    """
    if not int(os.environ.get("MWM_SERVICES_PORT_OFFSET") or 0):
        raise AssertionError(
            f"scripts/services {' '.join(args)} refused on the shared stack: set MWM_SERVICES_PORT_OFFSET "
            "(the fault suite, `bash scripts/faults`, runs on a stack of its own)"
        )
    subprocess.run(
        ["bash", str(REPO / "scripts" / "services"), *args],
        check=True,
        capture_output=True,
        timeout=180,
        env=dict(os.environ),
    )


def rabbitmq_nodename() -> str:
    """The node ``scripts/services`` runs for this environment's stack (``RABBITMQ_NODENAME`` wins)."""
    offset = int(os.environ.get("MWM_SERVICES_PORT_OFFSET") or 0)
    default = f"rabbit-o{offset}@localhost" if offset else "rabbit@localhost"
    return os.environ.get("RABBITMQ_NODENAME", default)


def consumer_log(settings: Settings, process: subprocess.Popen[bytes]) -> str:
    """The end of what a replica started by ``consumer_processes`` logged."""
    return (Path(settings.work_dir) / "logs" / f"{process.pid}.log").read_text(errors="replace")[-3000:]


async def cleanup(settings: Settings) -> None:
    """Remove this test's queues, exchanges, database and bucket."""
    connection = await aio_pika.connect(settings.bus.url)
    async with connection:
        channel = await connection.channel()
        for name in await _queues_with_prefix(settings):
            await channel.queue_delete(name)
        for name in (settings.bus.exchange, settings.bus.dead_letter_exchange):
            await channel.exchange_delete(name)
    async with Database(settings.mongo) as database:
        await database.db.client.drop_database(settings.mongo.database)
    async with ObjectStore(settings.object_store) as objects:
        await objects.remove_prefix("")
        await asyncio.to_thread(objects._client.remove_bucket, objects.bucket)


async def _queues_with_prefix(settings: Settings) -> list[str]:
    prefix = settings.bus.queue_prefix + "."
    return [row[0] for row in await _list_queues("name") if row[0].startswith(prefix)]


async def _list_queues(*columns: str) -> list[list[str]]:
    """``rabbitmqctl list_queues`` of this stack's node: one row of ``columns`` per queue."""
    listing = await asyncio.create_subprocess_exec(
        "rabbitmqctl",
        "list_queues",
        "-q",
        "--no-table-headers",
        *columns,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
        env={**os.environ, "RABBITMQ_NODENAME": rabbitmq_nodename()},
    )
    stdout, _ = await listing.communicate()
    return [line.split() for line in stdout.decode().splitlines() if line.strip()]


async def queue_settled(queue: str, timeout: float = 30) -> None:
    """Wait until ``queue`` holds no message, ready or unacknowledged: every delivery so far was handled.

    What a test waits on before asserting that something did *not* happen (a second effect, an extra event).
    """

    async def settled() -> bool:
        counts = {row[0]: row[1] for row in await _list_queues("name", "messages") if len(row) == 2}
        return counts.get(queue) == "0"

    await wait_for(settled, timeout, f"queue {queue} to hold no message", interval=0.2)


@contextmanager
def consumer_processes(
    settings: Settings, name: str, count: int = 1, extra_env: Mapping[str, str] | None = None
) -> Iterator[list[subprocess.Popen[bytes]]]:
    """``count`` replicas of ``mwm consume NAME`` as child processes; stopped (SIGKILL) on exit.

    Each replica logs (unbuffered, so a SIGKILL loses nothing) to ``consumer_log(settings, process)``.
    """
    env = {**settings_env(settings), **(extra_env or {}), "PYTHONUNBUFFERED": "1"}
    logs = Path(settings.work_dir) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    processes = []
    for _ in range(count):
        with tempfile.NamedTemporaryFile(dir=logs, suffix=".log", delete=False) as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "wm", "consume", name],
                env=env,
                cwd=REPO,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        Path(log.name).rename(logs / f"{process.pid}.log")
        processes.append(process)
    try:
        yield processes
    finally:
        for process in processes:
            if process.poll() is None:
                process.send_signal(signal.SIGKILL)
            process.wait(timeout=10)
