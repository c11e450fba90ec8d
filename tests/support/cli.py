"""The real ``mwm`` command as a subprocess, pointed at an API served by the test."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from devkit.peers import LOCALHOST, free_port
from devkit.services import REPO, settings_env
from schemas.applications import ApplicationDefinition
from tests.support.api import api_settings
from wm.api.app import create_app
from wm.api.server import running
from wm.config import Settings

TIMEOUT_S = 60.0


@dataclass
class Result:
    """How a command ended and what it printed."""

    code: int
    out: str
    err: str


@dataclass
class Cli:
    """Runs ``python -m wm ARGS`` in ``env`` (see `devkit.services.settings_env`)."""

    env: dict[str, str]

    async def spawn(self, *args: str) -> asyncio.subprocess.Process:
        """Start the command; its stdout and stderr are pipes."""
        return await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "wm",
            *args,
            env=self.env,
            cwd=REPO,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )

    async def __call__(self, *args: str) -> Result:
        """Run the command to its end."""
        process = await self.spawn(*args)
        return await finished(process)


async def finished(process: asyncio.subprocess.Process, timeout: float = TIMEOUT_S) -> Result:
    """Wait for a spawned command to end and collect the rest of its output."""
    out, err = await asyncio.wait_for(process.communicate(), timeout=timeout)
    assert process.returncode is not None
    return Result(process.returncode, out.decode(), err.decode())


async def no_engine_problems(application: ApplicationDefinition) -> list[str]:
    """An engine check that finds nothing wrong (the engines' own checks are tested on their own)."""
    return []


@asynccontextmanager
async def cli_against_api(live_settings: Settings) -> AsyncIterator[Cli]:
    """The command pointed at the API serving ``live_settings`` on a free port, in this event loop."""
    settings = api_settings(live_settings, free_port())
    async with running(create_app(settings, no_engine_problems), LOCALHOST, settings.api.port):
        yield Cli(settings_env(settings))
