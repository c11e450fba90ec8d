"""``mwm api`` (serve the REST API) and ``mwm keys`` (API keys, written straight to the database).

``mwm keys create`` is how an operator gets the first keys: it needs the database, not the API.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Annotated, TypeVar

import typer

from wm.adapters.mongo import Database
from wm.cli.output import OutputFormat, emit
from wm.config import Settings
from wm.errors import MwmError
from wm.logging import configure_logging
from wm.registry import migrate
from wm.stores.auth import ApiKeys, Scope

T = TypeVar("T")

keys_app = typer.Typer(
    help="API keys: create, list, revoke (directly in the database).", no_args_is_help=True
)


def api(
    host: Annotated[str | None, typer.Option("--host", help="bind address [default: MWM_API__HOST]")] = None,
    port: Annotated[int | None, typer.Option("--port", help="port [default: MWM_API__PORT]")] = None,
) -> None:
    """Serve the REST API (OpenAPI at /docs) until interrupted."""
    from wm.api.server import (
        serve_api,
    )  # imported here: FastAPI and pynetdicom would slow every other command

    settings = Settings()
    configure_logging(settings.observability.log_format, settings.observability.log_level)
    serve_api(settings, host, port)


def _with_keys(action: Callable[[ApiKeys], Awaitable[T]]) -> T:
    async def run() -> T:
        async with Database(Settings().mongo) as database:
            await migrate(database)
            return await action(ApiKeys(database))

    try:
        return asyncio.run(run())
    except MwmError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc


@keys_app.command("create")
def keys_create(
    name: Annotated[str, typer.Option("--name", help="a unique name for the key")],
    scope: Annotated[Scope, typer.Option("--scope", help="admin, gateway or read")],
) -> None:
    """Create a key and print its token (shown this once only)."""
    key, token = _with_keys(lambda keys: keys.create(name, scope))
    typer.echo(token)
    typer.echo(
        f"created API key {key.name} ({key.scope}); store the token now, it is not shown again", err=True
    )


@keys_app.command("list")
def keys_list(output: Annotated[OutputFormat, typer.Option("--output", "-o")] = OutputFormat.table) -> None:
    """Every key (never the secrets)."""
    keys = _with_keys(lambda store: store.all())
    rows = [key.model_dump(mode="json") for key in keys]
    emit(rows, ["name", "scope", "key_id", "created_at", "revoked_at"], output)


@keys_app.command("revoke")
def keys_revoke(name: Annotated[str, typer.Argument(help="the key's name")]) -> None:
    """Revoke a key: requests with it are refused from now on."""
    key = _with_keys(lambda keys: keys.revoke(name))
    typer.echo(f"revoked API key {key.name}")
