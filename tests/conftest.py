"""Fixtures shared by every test: each test gets its own settings (queues, database, bucket).

Every test is marked by where it lives: ``unit`` under ``tests/unit`` (no service, seconds in all),
``integration`` under ``tests/integration``, ``tests/features`` and ``tests/helm`` (real services or tools),
so ``pytest -m unit`` runs the fast suite alone.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from devkit.services import cleanup, unique_settings
from tests.support.services import require_services
from wm.config import Settings

MARKS_BY_DIRECTORY = {
    "unit": "unit",
    "integration": "integration",
    "features": "integration",
    "helm": "integration",
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark each test ``unit`` or ``integration`` by its directory under ``tests/``."""
    tests = Path(__file__).parent
    for item in items:
        relative = item.path.relative_to(tests) if item.path.is_relative_to(tests) else None
        mark = MARKS_BY_DIRECTORY.get(relative.parts[0]) if relative and len(relative.parts) > 1 else None
        if mark is not None:
            item.add_marker(mark)


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
