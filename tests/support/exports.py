"""Export tasks for the Export API and export-client tests: files in the store, tasks, the API."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from devkit.peers import LOCALHOST, free_port
from schemas.events import ExportRequested, FileRef, SinkRef, utc_now
from tests.support.api import api_settings
from wm.adapters.mongo import Database
from wm.adapters.objectstore import ObjectStore
from wm.api.app import create_app
from wm.api.server import running
from wm.config import Settings
from wm.domain.exports import task_for
from wm.stores.auth import ApiKeys
from wm.stores.exports import INDEXES, ExportTasks

SINK = "ig"


@dataclass
class ServedApi:
    """The API serving a test's settings, an admin client, and a gateway-scope key for export clients."""

    settings: Settings
    admin: httpx.AsyncClient
    gateway_token: str
    read_token: str
    tasks: ExportTasks

    def client(self, token: str | None = None) -> httpx.AsyncClient:
        """A client with ``token`` (default: the gateway key)."""
        headers = {"Authorization": f"Bearer {token or self.gateway_token}"}
        return httpx.AsyncClient(base_url=self.settings.api.url, headers=headers)


@asynccontextmanager
async def served_api(settings: Settings) -> AsyncIterator[ServedApi]:
    """``settings``' API on a free port (in this event loop), with a gateway key created for the test."""
    settings = api_settings(settings, free_port())
    headers = {"Authorization": f"Bearer {settings.api.token}"}
    async with (
        running(create_app(settings), LOCALHOST, settings.api.port),
        httpx.AsyncClient(base_url=settings.api.url, headers=headers) as admin,
        Database(settings.mongo, INDEXES) as database,
    ):
        _, gateway = await ApiKeys(database).create("export-client", "gateway")
        _, reader = await ApiKeys(database).create("reader", "read")
        yield ServedApi(settings, admin, gateway, reader, ExportTasks(database))


async def upload(settings: Settings, paths: Sequence[Path], job_id: str) -> list[FileRef]:
    """Put files under the job's output prefix, as an engine would."""
    async with ObjectStore(settings.object_store) as objects:
        return [await objects.put_file(f"jobs/{job_id}/output/{path.name}", path) for path in paths]


async def create_task(tasks: ExportTasks, job_id: str, files: Sequence[FileRef], sink: str = SINK) -> str:
    """A pending task of the ``external`` sink ``sink`` for ``files``; its id."""
    event = ExportRequested(
        correlation_id=f"corr-{job_id}",
        export_task_id=f"{job_id}.{sink}",
        job_id=job_id,
        application_id="seg",
        sink=SinkRef(name=sink, type="external"),
        files=list(files),
    )
    assert await tasks.create(task_for(event, utc_now()))
    return event.export_task_id


def placeholder_files(settings: Settings, job_id: str, count: int = 2) -> list[FileRef]:
    """References to files that need not exist (for tests that never download)."""
    bucket = settings.object_store.bucket
    return [FileRef(bucket=bucket, key=f"jobs/{job_id}/output/{n}.dcm", size=1) for n in range(count)]
