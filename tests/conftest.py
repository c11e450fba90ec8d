"""Fixtures shared by every test: each test gets its own settings (queues, database, bucket)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.support.services import cleanup, require_services, unique_settings
from wm.config import Settings


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    """Settings unique to this test; no real service is touched."""
    return unique_settings(tmp_path / "work")


@pytest.fixture
async def live_settings(settings: Settings) -> AsyncIterator[Settings]:
    """``settings`` on the real services: fails (never skips) when one is unreachable; cleans up."""
    require_services(settings)
    yield settings
    await cleanup(settings)
