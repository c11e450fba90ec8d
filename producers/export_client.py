"""The reference export client: pulls export tasks through the Export API and sends them by C-STORE.

``mwm export-client --sink NAME --ae-title AET --host H --port P`` loops:

1. claim the oldest claimable task of the sink (``POST /exports/claim``; nothing claimable: wait
   ``--poll-interval`` seconds, or end with ``--once``);
2. send its files with MWM's own DICOM sink (`wm.sinks.dicom.DicomSink`: the same associations, retries
   and per-file results as the exporter), reading them through the API (``GET /exports/{id}/files/{i}``)
   instead of the object store, while a heartbeat extends the lease;
3. report every file's result and the final state (``PUT /exports/{id}``, outcome computed by MWM), which
   publishes ``export.completed``. If sending or reporting fails, the task is given back
   (``DELETE /exports/{id}/lease``) so another client takes it at once instead of after the lease.

A destination that is unavailable (refusing connections, aborting, not answering: the sink's
``DestinationUnavailable``) is waited for as the exporter's delayed redelivery waits
(``RedeliveryPolicy``: ``export.redelivery_*``, backoff with jitter over the window): the files that got
through are reported as progress (a client that dies meanwhile loses nothing sent), the lease is renewed
all along, and only the files not sent yet go again. Past the window they fail (``mwm exports retry`` sends
them later). Stopping while waiting gives the task back. A rejected association fails at once.

SIGTERM or SIGINT stops the loop after the current task. HTTP errors become ``wm.errors`` types here:
404 ``NotFound``, 409 ``Conflict``, 5xx and connection failures ``TransientError``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import structlog

from schemas.applications import DicomSinkArgs, SinkDefinition
from schemas.events import FileExportResult
from wm.config import Settings
from wm.domain.exports import ExportTask, Lease, RedeliveryPolicy, failed_result, kept_results, unsent
from wm.errors import Conflict, MwmError, NotFound, PermanentError, TransientError
from wm.leases import renewed
from wm.service_layer.periodic import every, stopped_within
from wm.sinks import DestinationUnavailable
from wm.sinks.dicom import DicomSink, DicomSinkSettings

log = structlog.get_logger("producers.export_client")


@dataclass(frozen=True)
class ClientOptions:
    """What the client exports and where to."""

    sink: str
    owner: str
    destination: DicomSinkArgs
    lease_s: float
    poll_interval_s: float
    once: bool = False


@dataclass(frozen=True)
class Claimed:
    """A task this client holds, and its lease."""

    task: ExportTask
    lease: Lease

    def quote(self) -> dict[str, Any]:
        """The lease as requests quote it."""
        return {"owner": self.lease.owner, "lease": self.lease.number}


class ExportApi:
    """The Export API over HTTP (an adapter: raises only ``wm.errors`` types)."""

    def __init__(self, http: httpx.AsyncClient) -> None:
        self.http = http

    async def claim(self, sink: str, owner: str, lease_s: float) -> Claimed | None:
        """Claim a task of ``sink``; None when there is none."""
        body = {"sink": sink, "owner": owner, "lease_s": lease_s}
        response = await self._call("POST", "/exports/claim", json=body)
        if response.status_code == 204:
            return None
        data = response.json()
        return Claimed(ExportTask.model_validate(data["task"]), Lease.model_validate(data["lease"]))

    async def extend(self, claimed: Claimed, lease_s: float) -> None:
        """Extend the lease."""
        task_id = claimed.task.export_task_id
        await self._call("POST", f"/exports/{task_id}/lease", json={**claimed.quote(), "lease_s": lease_s})

    async def finish(self, claimed: Claimed, results: list[FileExportResult]) -> ExportTask:
        """Report every file's result; MWM computes the final state and publishes ``export.completed``."""
        body = {**claimed.quote(), "file_results": [r.model_dump() for r in results], "final": True}
        response = await self._call("PUT", f"/exports/{claimed.task.export_task_id}", json=body)
        return ExportTask.model_validate(response.json())

    async def report(self, claimed: Claimed, results: list[FileExportResult], message: str) -> None:
        """Report progress: the results so far (the task stays held)."""
        body = {**claimed.quote(), "file_results": [r.model_dump() for r in results], "message": message}
        await self._call("PUT", f"/exports/{claimed.task.export_task_id}", json=body)

    async def release(self, claimed: Claimed) -> None:
        """Give the task back."""
        await self._call("DELETE", f"/exports/{claimed.task.export_task_id}/lease", params=claimed.quote())

    async def download(self, task_id: str, index: int, path: Path) -> None:
        """Stream file ``index`` of the task to ``path``."""
        async with self._stream(f"/exports/{task_id}/files/{index}") as chunks:
            handle = await asyncio.to_thread(path.open, "wb")
            try:
                async for chunk in chunks:
                    await asyncio.to_thread(handle.write, chunk)
            finally:
                await asyncio.to_thread(handle.close)

    @contextlib.asynccontextmanager
    async def _stream(self, url: str) -> AsyncIterator[AsyncIterator[bytes]]:
        try:
            async with self.http.stream("GET", url) as response:
                if response.is_error:
                    await response.aread()
                    _raise_for(response)
                yield response.aiter_bytes()
        except httpx.TransportError as exc:
            raise TransientError(f"GET {url}: the MWM API is unreachable: {exc!r}") from exc

    async def _call(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        try:
            response = await self.http.request(method, url, **kwargs)
        except httpx.TransportError as exc:
            raise TransientError(f"{method} {url}: the MWM API is unreachable: {exc!r}") from exc
        _raise_for(response)
        return response


def _raise_for(response: httpx.Response) -> None:
    """The ``wm.errors`` type of an error response (its problem detail as the message)."""
    if not response.is_error:
        return
    try:
        detail = str(response.json().get("detail", response.text))
    except ValueError:
        detail = response.text
    what = f"{response.request.method} {response.request.url.path}: {response.status_code} {detail}"
    if response.status_code == 404:
        raise NotFound(what)
    if response.status_code == 409:
        raise Conflict(what)
    if response.status_code >= 500:
        raise TransientError(what)
    raise PermanentError(what)


class ApiFiles:
    """A sink's file source (`wm.sinks.FileSource`) reading one task's files through the Export API."""

    def __init__(self, api: ExportApi, task: ExportTask) -> None:
        self.api = api
        self.task_id = task.export_task_id
        self.index = {file.key: index for index, file in reversed(list(enumerate(task.files)))}

    async def download_file(self, key: str, path: Path) -> None:
        """Download the task's file ``key`` to ``path``."""
        path.parent.mkdir(parents=True, exist_ok=True)
        await self.api.download(self.task_id, self.index[key], path)

    async def fetch(self, key: str, path: Path, hold: Callable[[int], bool]) -> bytes | None:
        """Download the task's file ``key`` to ``path`` (None: the Export API streams every file to disk)."""
        await self.download_file(key, path)
        return None


async def export_one(
    api: ExportApi,
    claimed: Claimed,
    settings: Settings,
    options: ClientOptions,
    stop: asyncio.Event | None = None,
) -> ExportTask | None:
    """Send the claimed task's files and report the results; None when ``stop`` came while the destination
    was awaited. The task is given back then, and if sending or reporting fails."""
    definition = SinkDefinition(name=options.sink, type="dicom", args=options.destination)
    sink = DicomSink(definition, DicomSinkSettings.of(settings), ApiFiles(api, claimed.task))
    try:
        async with renewed(lambda: api.extend(claimed, options.lease_s), options.lease_s, "export lease"):
            results = await _send_awaiting_destination(api, claimed, sink, settings, stop or asyncio.Event())
        if results is None:
            await api.release(claimed)
            return None
        return await api.finish(claimed, results)
    except BaseException:
        with contextlib.suppress(MwmError):
            await api.release(claimed)
        raise


async def _send_awaiting_destination(
    api: ExportApi, claimed: Claimed, sink: DicomSink, settings: Settings, stop: asyncio.Event
) -> list[FileExportResult] | None:
    """Every file's result, the unavailable destination awaited over the redelivery window; None on stop."""
    export = settings.export
    policy = RedeliveryPolicy(
        export.redelivery_window_s, export.redelivery_initial_delay_s, export.redelivery_max_delay_s
    )
    files = claimed.task.files
    sent = kept_results(claimed.task.file_results)  # by an earlier holder, reported before it let go
    since, retries = datetime.now(UTC), 0
    while True:
        try:
            return [*sent, *(await sink.export(unsent(files, sent))).results]
        except DestinationUnavailable as exc:
            sent = [*sent, *kept_results(exc.results)]
            due = policy.next_at(since, retries, datetime.now(UTC))
            if due is None:
                reason = f"{exc.reason}; still unavailable after the redelivery window"
                return [*sent, *failed_result(unsent(files, sent), reason).results]
            retries += 1
            message = f"{exc.reason}; sent again after {due.isoformat()}"
            await api.report(claimed, sent, message)
            log.warning(
                "export_destination_unavailable", export_task_id=claimed.task.export_task_id, retry_at=due
            )
            if await stopped_within(stop, (due - datetime.now(UTC)).total_seconds()):
                return None


async def run_client(settings: Settings, options: ClientOptions, token: str, stop: asyncio.Event) -> int:
    """Export tasks until ``stop`` is set (or one claim with ``once``); returns how many were exported."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    exported = 0
    async with httpx.AsyncClient(
        base_url=settings.api.url, headers=headers, timeout=settings.api.client_timeout_s
    ) as http:
        api = ExportApi(http)

        async def claim_and_export() -> bool:
            """One claim; whether a task was claimed (then the next claim follows at once)."""
            nonlocal exported
            claimed = await api.claim(options.sink, options.owner, options.lease_s)
            if claimed is None:
                return False
            final = await export_one(api, claimed, settings, options, stop)
            if final is not None:
                exported += 1
                log.info("export_task_done", export_task_id=final.export_task_id, state=final.state)
            return True

        if options.once:
            await claim_and_export()  # an error ends the command (exit status 1)
        else:  # a daemon: an unreachable API or a failed task is logged, and the next poll tries again
            await every(options.poll_interval_s, stop, claim_and_export, "export_client_poll")
    return exported
