"""MWM processes started by tests and benchmarks: serving the API as a subprocess, memory readings."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx

from devkit.services import REPO, settings_env, wait_for
from wm.config import Settings

STARTUP_TIMEOUT_S = 30.0


def peak_rss_mb(pid: int) -> float:
    """The process's peak resident set size so far (VmHWM), in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmHWM for pid {pid}")


async def answers_health(client: httpx.AsyncClient) -> bool:
    """Whether the API behind ``client`` answers ``/health`` with 200."""
    try:
        return (await client.get("/health")).status_code == 200
    except httpx.TransportError:
        return False


@asynccontextmanager
async def api_process(settings: Settings) -> AsyncIterator[int]:
    """``python -m wm api`` serving ``settings`` in its own process; yields its pid once it answers."""
    server = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "wm",
        "api",
        env=settings_env(settings),
        cwd=REPO,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        async with httpx.AsyncClient(base_url=settings.api.url) as client:
            await wait_for(lambda: answers_health(client), STARTUP_TIMEOUT_S, "mwm api to answer /health")
        yield server.pid
    finally:
        server.terminate()
        await server.wait()
