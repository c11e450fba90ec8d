"""Serving the API with uvicorn: in the foreground (``mwm api``) or in the background of an event loop.

``mwm api`` runs like every other role: its API port and the observability port (``/healthz``,
``/readyz`` with the database, broker and object store the API uses, ``/metrics`` with the fleet gauges of
`wm.fleet`) are bound before anything connects; SIGTERM makes ``/readyz`` answer 503, lets requests in
flight finish within ``observability.drain_timeout_s`` and exits.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import structlog
import uvicorn
from fastapi import FastAPI

from wm.adapters.rabbitmq import Bus
from wm.api.app import create_app
from wm.config import Settings
from wm.errors import TransientError
from wm.fleet import FleetGauges
from wm.observability import (
    Check,
    EmbeddedServer,
    listen,
    listen_observability,
    observability_app,
    serve,
    stop_on_signals,
)

log = structlog.get_logger("wm.api")

STARTUP_TIMEOUT_S = 30.0


def serve_api(settings: Settings, host: str | None = None, port: int | None = None) -> None:
    """Run the API and its observability port until SIGTERM/SIGINT, then drain and exit."""
    api_port = port or settings.api.port
    listener = listen(host or settings.api.host, api_port, "MWM_API__PORT")
    asyncio.run(_serve(settings, listener))


async def _serve(settings: Settings, listener: socket.socket) -> None:
    observability = settings.observability
    probes = listen_observability(observability)
    stop = stop_on_signals()
    app = create_app(settings)
    server = EmbeddedServer(
        uvicorn.Config(
            app,
            log_config=None,
            lifespan="on",
            timeout_graceful_shutdown=int(observability.drain_timeout_s),
        )
    )
    api = asyncio.create_task(server.serve(sockets=[listener]))
    checks: dict[str, Check] | None = None
    gauges: FleetGauges | None = None

    async def refresh() -> None:
        if gauges is not None:
            await gauges.refresh()

    probes_stop = asyncio.Event()
    http = (
        None
        if probes is None
        else asyncio.create_task(serve(observability_app(lambda: checks, refresh), probes, probes_stop))
    )
    try:
        while not server.started:
            if api.done():
                await api
                raise TransientError(
                    "the API could not start: a service it needs did not answer (see the log)"
                )
            await asyncio.sleep(0.05)
        state = app.state
        checks = {
            "database": state.database.ping,
            "bus": _connected(state.bus),
            "object_store": state.objects.ping,
        }
        gauges = FleetGauges(state.database, state.bus)
        log.info("process_ready", role="api")
        await asyncio.wait({api, asyncio.create_task(stop.wait())}, return_when=asyncio.FIRST_COMPLETED)
        checks = None
        log.info("draining", timeout_s=observability.drain_timeout_s)
        server.should_exit = True
        await api
    finally:
        probes_stop.set()
        if http is not None:
            await http
    log.info("stopped")


def _connected(bus: Bus) -> Check:
    async def check() -> bool:
        return bus.is_connected

    return check


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
