"""The fault suite stops and restarts services: it runs only on a stack of its own.

``scripts/faults`` sets ``MWM_SERVICES_PORT_OFFSET`` and points the ``MWM_*`` URLs at that stack. A plain
``pytest`` does not collect this folder (``norecursedirs``); run against the shared stack (no offset) or
with URLs that do not name the offset stack's ports, every test here fails with a message saying so.
"""

from __future__ import annotations

import os

import pytest

from devkit.services import service_endpoints
from wm.config import Settings

DEFAULT_PORTS = {"RabbitMQ": 5672, "MongoDB-wire server": 27017, "S3 server": 8333}


def port_offset() -> int:
    return int(os.environ.get("MWM_SERVICES_PORT_OFFSET") or 0)


@pytest.fixture(autouse=True)
def isolated_stack(settings: Settings) -> None:
    """Fail unless every service URL points at the offset stack the suite restarts."""
    offset = port_offset()
    if not offset:
        pytest.fail(
            "the fault suite restarts services: run it on a stack of its own with `bash scripts/faults`"
        )
    wrong = [
        f"{name} at {host}:{port} (expected port {DEFAULT_PORTS[name] + offset})"
        for name, (host, port) in service_endpoints(settings).items()
        if port != DEFAULT_PORTS[name] + offset
    ]
    if wrong:
        pytest.fail("MWM_* URLs do not point at the offset stack: " + ", ".join(wrong))
