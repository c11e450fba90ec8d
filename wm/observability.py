"""The observability port of every role: ``/healthz``, ``/readyz`` and ``/metrics``, and binding its sockets.

Every long-running role (``mwm api``, ``mwm gateway``, ``mwm consume``, ``mwm run``) serves the same three
routes on ``MWM_OBSERVABILITY__HTTP_HOST:HTTP_PORT``:

- ``/healthz``: 200 while the process runs its event loop (the liveness probe).
- ``/readyz``: 200 when every service the role uses answers (broker, database, object store), else 503
  with the failing checks; 503 too while the role starts or drains (the readiness probe).
- ``/metrics``: Prometheus text; ``refresh`` (the API's fleet gauges) runs first.

Sockets are bound before anything connects, so a port in use ends the process at once with one line that
names the variable (`wm.errors.ConfigurationError`) instead of a uvicorn traceback after start-up.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import signal
import socket
from collections.abc import Awaitable, Callable, Iterator, Mapping
from typing import Any

import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from wm.config import ObservabilitySettings
from wm.errors import ConfigurationError

Check = Callable[[], Awaitable[bool]]
Checks = Callable[[], Mapping[str, Check] | None]
"""The readiness checks of a role by name; None while the role starts or drains (not ready)."""

HTTP_PORT_VARIABLE = "MWM_OBSERVABILITY__HTTP_PORT"


def listen(host: str, port: int, variable: str) -> socket.socket:
    """A listening TCP socket on ``host:port``; `ConfigurationError` naming ``variable`` if it cannot bind."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise cannot_listen(variable, host, port, exc) from exc
    sock.setblocking(False)
    return sock


def cannot_listen(variable: str, host: str, port: int, exc: OSError) -> ConfigurationError:
    """The one line for a port this process could not listen on, naming the setting to change."""
    if exc.errno == errno.EADDRINUSE:
        return ConfigurationError(
            f"{variable}={port}: port {port} on {host} is already in use (another MWM process?); "
            f"set {variable} to a free port"
        )
    return ConfigurationError(f"{variable}={port}: cannot listen on {host}:{port}: {exc.strerror}")


def listen_observability(settings: ObservabilitySettings) -> socket.socket | None:
    """The observability socket, or None when ``http_port`` is 0 (off)."""
    if not settings.http_port:
        return None
    return listen(settings.http_host, settings.http_port, HTTP_PORT_VARIABLE)


def observability_app(checks: Checks, refresh: Callable[[], Awaitable[None]] | None = None) -> Starlette:
    """``/healthz``, ``/readyz`` (the role's ``checks``) and ``/metrics`` (after ``refresh``)."""

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "alive"})

    async def readyz(request: Request) -> Response:
        current = checks()
        if current is None:
            return JSONResponse({"status": "not ready", "checks": {}}, status_code=503)
        names = list(current)
        results = await asyncio.gather(*(_safely(current[name]) for name in names))
        outcome = dict(zip(names, results, strict=True))
        ready = all(results)
        return JSONResponse(
            {"status": "ready" if ready else "not ready", "checks": outcome},
            status_code=200 if ready else 503,
        )

    async def metrics(request: Request) -> Response:
        if refresh is not None:
            await refresh()
        return PlainTextResponse(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return Starlette(
        routes=[Route("/healthz", healthz), Route("/readyz", readyz), Route("/metrics", metrics)]
    )


async def _safely(check: Check) -> bool:
    # A probe answers within the kubelet's timeout: a service that hangs counts as down.
    try:
        async with asyncio.timeout(2.5):
            return await check()
    except Exception:
        return False


class EmbeddedServer(uvicorn.Server):
    """uvicorn without its own signal handlers: the role owns SIGTERM and drains first."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        # uvicorn ends a failed lifespan start-up with sys.exit(3) inside its task, which asyncio re-raises
        # out of the event loop: stop serving instead (uvicorn has logged why), the caller reports it.
        try:
            await super().startup(sockets)
        except SystemExit:
            self.should_exit = True


def server_config(app: Any, **options: Any) -> uvicorn.Config:
    """uvicorn settings shared by every server: logs through the process's logging (JSON when chosen)."""
    options.setdefault("lifespan", "off")
    return uvicorn.Config(app, log_config=None, access_log=False, **options)


async def serve(app: Any, listener: socket.socket, stop: asyncio.Event) -> None:
    """Serve an ASGI app on a bound socket until ``stop`` is set."""
    server = EmbeddedServer(server_config(app))
    serving = asyncio.create_task(server.serve(sockets=[listener]))
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait({serving, stopping}, return_when=asyncio.FIRST_COMPLETED)
    server.should_exit = True
    stopping.cancel()
    await serving


def stop_on_signals() -> asyncio.Event:
    """An event set by SIGTERM or SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop
