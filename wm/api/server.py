"""Serving the API with uvicorn: in the foreground (``mwm api``) or in the background of an event loop."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import uvicorn
from fastapi import FastAPI

from wm.api.app import create_app
from wm.config import Settings

STARTUP_TIMEOUT_S = 30.0


def serve(settings: Settings, host: str | None = None, port: int | None = None) -> None:
    """Run the API until interrupted (SIGINT/SIGTERM stop it gracefully)."""
    uvicorn.run(create_app(settings), host=host or settings.api.host, port=port or settings.api.port)


@asynccontextmanager
async def running(app: FastAPI, host: str, port: int) -> AsyncIterator[str]:
    """Serve ``app`` on ``host:port`` inside this event loop; yields the base URL once it is ready."""
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on"))
    task = asyncio.create_task(server.serve())
    try:
        async with asyncio.timeout(STARTUP_TIMEOUT_S):
            while not server.started:
                if task.done():
                    await task
                    raise RuntimeError("the API failed to start (see its log)")
                await asyncio.sleep(0.02)
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        await task
