"""In-memory fakes of the ports the IG consumers use (``wm.ports``), beside ``tests/unit/fakes.py``, and
the IG's golden messages (``tests/fixtures/monai_ig``) and deliveries as its broker hands them over.

Every call of ``FakeIgExports`` and ``ConfirmingPublisher`` yields to the event loop first, as a round trip
to the database or a broker confirm does: handlers run concurrently on them interleave at the same points
as on the real services, so a race between two deliveries shows here too.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from devkit.ig_emulator import APP_ID, Version
from schemas.events import Event, FileRef, PayloadArrived
from schemas.monai_ig import IgMessage
from tests.unit.fakes import FakePublisher, Outage
from wm.domain.discovery import Candidate
from wm.domain.monai_ig import IgExport
from wm.errors import Duplicate, NotFound

FIXTURES = Path(__file__).parents[1] / "fixtures" / "monai_ig"


def golden(name: str, version: Version) -> dict[str, Any]:
    """The golden body of an IG message (``workflow_request``, ``export_request``, ``export_complete``)."""
    loaded: dict[str, Any] = json.loads((FIXTURES / f"{name}.{version}.json").read_text())
    return loaded


@dataclass
class Delivery:
    """A delivery from the IG's broker, with the properties ``wm.adapters.monai_ig.decode`` checks."""

    body: bytes
    message_id: str | None = "m1"
    type: str | None = "ExportCompleteEvent"
    content_type: str | None = "application/json"
    app_id: str | None = APP_ID
    correlation_id: str | None = "c1"


def _now() -> datetime:
    return datetime.now(UTC)


class ConfirmingPublisher(FakePublisher):
    """A ``FakePublisher`` whose publish waits for the broker's confirm (one turn of the event loop)."""

    async def publish(self, event: Event, *, message_id: str | None = None) -> str:
        await asyncio.sleep(0)
        return await super().publish(event, message_id=message_id)


class FakeObjectStore(Outage):
    """Objects with their bytes, by bucket and key; ``in_bucket`` is a view of the same store.

    The views share the objects, the outages (``fail_next``) and ``reads``: every key streamed or
    downloaded, in order.
    """

    def __init__(self, bucket: str = "mwm-test") -> None:
        super().__init__()
        self.bucket = bucket
        self.objects: dict[str, dict[str, bytes]] = {bucket: {}}
        self.reads: list[str] = []

    def in_bucket(self, bucket: str) -> FakeObjectStore:
        view = FakeObjectStore(bucket)
        view.objects, view.reads, view._failures = self.objects, self.reads, self._failures
        view.objects.setdefault(bucket, {})
        return view

    def put(self, key: str, data: bytes) -> FileRef:
        self.objects[self.bucket][key] = data
        return FileRef(bucket=self.bucket, key=key, size=len(data))

    def _data(self, key: str, bucket: str | None = None) -> bytes:
        try:
            return self.objects[bucket or self.bucket][key]
        except KeyError:
            raise NotFound(f"object {bucket or self.bucket}/{key} does not exist") from None

    async def copy(self, source_key: str, target_key: str, source_bucket: str | None = None) -> None:
        self._maybe_fail()
        self.objects[self.bucket][target_key] = self._data(source_key, source_bucket)

    async def list(self, prefix: str) -> list[FileRef]:
        self._maybe_fail()
        return [
            FileRef(bucket=self.bucket, key=key, size=len(data))
            for key, data in sorted(self.objects[self.bucket].items())
            if key.startswith(prefix)
        ]

    async def stream(self, key: str, chunk_size: int = 4) -> AsyncIterator[bytes]:
        self._maybe_fail()
        self.reads.append(key)
        data = self._data(key)
        for start in range(0, len(data), chunk_size):
            yield data[start : start + chunk_size]

    async def download_file(self, key: str, path: Path) -> None:
        self._maybe_fail()
        self.reads.append(key)
        await asyncio.to_thread(path.write_bytes, self._data(key))


@dataclass
class IgSend:
    body: IgMessage
    routing_key: str
    correlation_id: str
    message_id: str


class FakeIgPublisher(Outage):
    """Records what was published to the IG's exchange, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.sent: list[IgSend] = []

    async def publish(self, body: IgMessage, routing_key: str, correlation_id: str) -> str:
        self._maybe_fail()
        self.sent.append(IgSend(body, routing_key, correlation_id, str(uuid.uuid4())))
        return self.sent[-1].message_id

    async def run(self, stop: asyncio.Event) -> None:
        await stop.wait()


@dataclass
class Claim:
    task_id: str
    claimed_at: datetime
    published_at: datetime | None = None


class FakeIgExports(Outage):
    """Hand-offs unique by task id, and announcement claims unique by message id (won once)."""

    def __init__(self) -> None:
        super().__init__()
        self.exports: dict[str, IgExport] = {}
        self.claims: dict[str, Claim] = {}

    async def _call(self) -> None:
        await asyncio.sleep(0)
        self._maybe_fail()

    def _change(self, task_id: str, **changes: object) -> None:
        self.exports[task_id] = self.exports[task_id].model_copy(update=changes)

    async def begin(self, export: IgExport) -> None:
        await self._call()
        if export.export_task_id in self.exports:
            raise Duplicate(f"IG export {export.export_task_id} exists")
        self.exports[export.export_task_id] = export

    async def published(self, task_id: str) -> None:
        await self._call()
        self._change(task_id, published_at=_now())

    async def abandon(self, task_id: str) -> None:
        await self._call()
        if task_id in self.exports and self.exports[task_id].published_at is None:
            del self.exports[task_id]

    async def get(self, task_id: str) -> IgExport:
        await self._call()
        try:
            return self.exports[task_id]
        except KeyError:
            raise NotFound(f"no IG export for task {task_id!r}") from None

    async def resolve(self, task_id: str) -> None:
        await self._call()
        self._change(task_id, resolved=True)

    async def overdue(self, now: datetime) -> list[IgExport]:
        await self._call()
        return [e for e in self.exports.values() if not e.resolved and e.deadline < now]

    async def claim_announcement(self, message_id: str, task_id: str) -> bool:
        await self._call()
        if message_id in self.claims:
            return False
        self.claims[message_id] = Claim(task_id, _now())
        return True

    async def release_announcement(self, message_id: str) -> None:
        await self._call()
        if message_id in self.claims and self.claims[message_id].published_at is None:
            del self.claims[message_id]

    async def mark_announced(self, message_id: str) -> None:
        await self._call()
        self.claims[message_id].published_at = _now()

    async def stale_announcements(self, older_than: timedelta) -> list[tuple[str, str]]:
        await self._call()
        cutoff = _now() - older_than
        return [
            (message_id, claim.task_id)
            for message_id, claim in self.claims.items()
            if claim.published_at is None and claim.claimed_at <= cutoff
        ]

    async def reclaim_announcement(self, message_id: str, older_than: timedelta) -> bool:
        await self._call()
        claim = self.claims.get(message_id)
        if claim is None or claim.published_at is not None or claim.claimed_at > _now() - older_than:
            return False
        claim.claimed_at = _now()
        return True


class FakeAeCatalog(Outage):
    """Applications as the registry's catalog finds them: by the names an event carries, else by its
    called AE title (``wm.stores.catalog.RegistryCatalog``)."""

    def __init__(self, *candidates: Candidate) -> None:
        super().__init__()
        self.entries = list(candidates)

    async def candidates(self, event: PayloadArrived) -> list[Candidate]:
        self._maybe_fail()
        if event.application_ids:
            return [c for c in self.entries if c.name in event.application_ids]
        return [c for c in self.entries if event.called_ae_title in c.definition.ae_titles]
