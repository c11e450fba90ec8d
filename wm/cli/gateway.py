"""``mwm gateway``: run the DICOM gateway (C-STORE SCP) until SIGTERM."""

from __future__ import annotations

import asyncio
from typing import Annotated

import typer

from wm.config import Settings
from wm.logging import configure_logging


def gateway(
    port: Annotated[int | None, typer.Option(min=1, max=65535, help="DICOM port (MWM_GATEWAY__PORT)")] = None,
    host: Annotated[str | None, typer.Option(help="bind address (MWM_GATEWAY__HOST)")] = None,
) -> None:
    """Receive DICOM (C-STORE, C-ECHO) for the mapped AE titles; store and announce every file."""
    from producers.gateway import run_gateway  # pynetdicom is imported only by this command

    settings = Settings()
    overrides = {key: value for key, value in (("port", port), ("host", host)) if value is not None}
    settings = settings.model_copy(update={"gateway": settings.gateway.model_copy(update=overrides)})
    configure_logging(settings.observability.log_format, settings.observability.log_level)
    asyncio.run(run_gateway(settings))
