"""``mwm export-client``: the reference export client (pull export tasks, send them by C-STORE)."""

from __future__ import annotations

import asyncio
import os
import socket
from typing import Annotated

import typer

from wm.cli.http import ApiUrl, Token, require_token
from wm.config import Settings
from wm.errors import MwmError
from wm.logging import configure_logging


def export_client(
    sink: Annotated[str, typer.Option("--sink", help="the sink whose tasks to export")],
    ae_title: Annotated[str, typer.Option("--ae-title", help="the destination's AE title")],
    host: Annotated[str, typer.Option("--host", help="the destination's host")],
    port: Annotated[int, typer.Option("--port", min=1, max=65535, help="the destination's DICOM port")],
    calling_ae_title: Annotated[str, typer.Option("--calling-ae-title", help="our AE title")] = "MWM",
    once: Annotated[bool, typer.Option("--once", help="export at most one task, then exit")] = False,
    poll_interval: Annotated[
        float, typer.Option("--poll-interval", min=0.05, help="seconds between claims when idle")
    ] = 5.0,
    lease_s: Annotated[
        float | None, typer.Option("--lease-s", min=1, help="lease length [default: MWM_EXPORT__LEASE_S]")
    ] = None,
    token: Token = None,
    api_url: ApiUrl = None,
) -> None:
    """Claim export tasks of a sink through the API, send their files by C-STORE, report the results."""
    from producers.export_client import ClientOptions, run_client  # pynetdicom only for this command
    from schemas.applications import DicomSinkArgs
    from wm.observability import stop_on_signals

    settings = Settings()
    if api_url:
        settings = settings.model_copy(update={"api": settings.api.model_copy(update={"url": api_url})})
    api_token = require_token(token, settings)
    configure_logging(settings.observability.log_format, settings.observability.log_level)
    options = ClientOptions(
        sink=sink,
        owner=f"export-client.{socket.gethostname()}.{os.getpid()}",
        destination=DicomSinkArgs(ae_title=ae_title, host=host, port=port, calling_ae_title=calling_ae_title),
        lease_s=lease_s or settings.export.lease_s,
        poll_interval_s=poll_interval,
        once=once,
    )

    async def main() -> int:
        return await run_client(settings, options, api_token, stop_on_signals())

    try:
        exported = asyncio.run(main())
    except MwmError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc
    typer.echo(f"exported {exported} task(s)")
