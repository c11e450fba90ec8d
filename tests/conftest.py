"""Fixtures shared by every test: each test gets its own settings (queues, database, bucket)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.support.services import cleanup, reachable, service_endpoints, unique_settings
from wm.config import Settings


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    """Settings unique to this test; no real service is touched."""
    return unique_settings(tmp_path / "work")


@pytest.fixture
async def live_settings(settings: Settings) -> AsyncIterator[Settings]:
    """``settings`` on the real services: fails (never skips) when one is unreachable; cleans up."""
    down = [
        f"{name} at {host}:{port}"
        for name, (host, port) in service_endpoints(settings).items()
        if not reachable(host, port)
    ]
    if down:
        pytest.fail("not reachable: " + ", ".join(down) + " (start them with `bash scripts/services up`)")
    yield settings
    await cleanup(settings)
