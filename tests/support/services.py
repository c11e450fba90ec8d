"""The tests' side of the real services: a test that needs one and cannot reach it fails, never skips."""

from __future__ import annotations

import pytest

from devkit.services import reachable, service_endpoints
from wm.config import Settings


def require_services(settings: Settings) -> None:
    """Fail the test (never skip it) when RabbitMQ, the MongoDB-wire server or S3 is unreachable."""
    down = [
        f"{name} at {host}:{port}"
        for name, (host, port) in service_endpoints(settings).items()
        if not reachable(host, port)
    ]
    if down:
        pytest.fail("not reachable: " + ", ".join(down) + " (start them with `bash scripts/services up`)")
