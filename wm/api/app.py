"""The FastAPI application: `create_app` builds it; its lifespan opens the database (and migrates it), the
object store and the broker connection.

Nothing connects at import. Every route but ``/health`` needs an API key (see `wm.stores.auth`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from wm.adapters.mongo import Database
from wm.adapters.objectstore import ObjectStore
from wm.adapters.rabbitmq import Bus
from wm.api import (
    routes_aetitles,
    routes_apps,
    routes_export_admin,
    routes_exports,
    routes_jobs,
    routes_payloads,
    routes_sinks,
)
from wm.api.problems import install_problem_handlers
from wm.config import Settings
from wm.registry import EngineValidator, Registry, engine_validator, migrate
from wm.retry import retrying
from wm.stores import exports
from wm.stores.auth import ApiKeys


def create_app(settings: Settings, validator: EngineValidator | None = None) -> FastAPI:
    """The MWM API; ``validator`` defaults to the installed engine plugins' own checks."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # A service down or slow at start-up (every pod of a release starting at once) is retried with
        # the configured backoff, as the consumers do, rather than failing the start.
        async with AsyncExitStack() as opened:
            database = await retrying(
                lambda: _migrated_database(opened, settings), settings.retry, "open and migrate the database"
            )
            objects = await retrying(
                lambda: opened.enter_async_context(ObjectStore(settings.object_store)),
                settings.retry,
                "connect to the object store",
            )
            bus = await retrying(
                lambda: opened.enter_async_context(Bus(settings.bus)), settings.retry, "connect to RabbitMQ"
            )
            keys = ApiKeys(database)
            if settings.api.bootstrap_admin_key:
                await keys.ensure_bootstrap(settings.api.bootstrap_admin_key)
            app.state.database = database
            app.state.api_keys = keys
            app.state.objects = objects
            app.state.bus = bus
            app.state.registry = Registry(database, validator or engine_validator(settings))
            app.state.settings = settings
            app.state.export_tasks = exports.ExportTasks(database)
            yield

    app = FastAPI(
        title="MWM",
        summary="Workload manager for medical-imaging AI: applications, sinks, AE titles and exports.",
        version="0.1.0",
        lifespan=lifespan,
        separate_input_output_schemas=False,
    )
    install_problem_handlers(app)
    app.add_api_route("/health", health, methods=["GET"], tags=["health"])
    for module in (routes_apps, routes_sinks, routes_aetitles, routes_jobs, routes_payloads):
        app.include_router(module.router)
    app.include_router(routes_exports.router)
    app.include_router(routes_export_admin.router)
    return app


async def _migrated_database(opened: AsyncExitStack, settings: Settings) -> Database:
    """The database, its indexes created and migrations applied; kept open by ``opened`` once it works."""
    async with AsyncExitStack() as attempt:
        database = await attempt.enter_async_context(Database(settings.mongo, exports.INDEXES))
        await migrate(database)
        opened.push_async_exit(attempt.pop_all())
        return database


async def health(request: Request) -> JSONResponse:
    """Open (no key): 200 when the database answers, else 503."""
    database: Database = request.app.state.database
    checks: dict[str, Any] = {"database": await database.ping()}
    ok = all(checks.values())
    return JSONResponse(
        {"status": "ok" if ok else "unavailable", "checks": checks}, status_code=200 if ok else 503
    )
