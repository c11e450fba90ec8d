"""``/exports``: the Export API for pull clients (export clients, an Informatics Gateway).

A client claims the oldest claimable task of its sink (``POST /exports/claim``: 200 with the task and its
lease, 204 when there is none), downloads the task's files (``GET /exports/{id}/files/{index}``), extends
its lease while it works (``POST /exports/{id}/lease``), reports per-file results (``PUT /exports/{id}``)
and finally the outcome (``PUT`` with ``final`` or a ``state``), which publishes ``export.completed``. It
gives a task back with ``DELETE /exports/{id}/lease``; a client that dies gives it back when its lease
expires. Two clients never hold the same task (`wm.stores.exports`). Every update quotes the lease (``owner``
and ``lease`` number): a client that does not hold the task's live lease gets 409.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Path, Query, Response
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field

from schemas.events import ExportOutcome, FileExportResult, Identifier
from wm.api.deps import GATEWAY, READ, BusDep, ExportTasksDep, ObjectsDep, PageDep, SettingsDep
from wm.domain.exports import ExportState, ExportTask, Lease
from wm.errors import NotFound
from wm.registry import Page
from wm.stores.exports import announce_completion

router = APIRouter(prefix="/exports", tags=["exports"])

MAX_LEASE_S = 86400.0
TaskPath = Annotated[str, Path(description="the export task id")]
LeaseSeconds = Annotated[
    float | None, Field(gt=0, le=MAX_LEASE_S, description="default: MWM_EXPORT__LEASE_S")
]


class ClaimRequest(BaseModel):
    """Body of ``POST /exports/claim``."""

    sink: Identifier = Field(description="the sink whose tasks the client exports")
    owner: Identifier = Field(description="the client's id: it holds the lease")
    lease_s: LeaseSeconds = None


class ClaimedTask(BaseModel):
    """A claimed task and the lease it is held under (quote ``lease.owner`` and ``lease.number`` back)."""

    task: ExportTask
    lease: Lease


class LeaseRef(BaseModel):
    """The lease a request acts under."""

    owner: Identifier
    lease: int = Field(ge=0, description="the lease number from the claim")


class LeaseExtension(LeaseRef):
    """Body of ``POST /exports/{id}/lease``."""

    lease_s: LeaseSeconds = None


class TaskUpdate(LeaseRef):
    """Body of ``PUT /exports/{id}``: progress, or the final update (``final`` or a ``state``).

    A final update without ``state`` computes the outcome from the results; a file never reported failed.
    """

    file_results: list[FileExportResult] = Field(default_factory=list)
    final: bool = False
    state: ExportOutcome | None = Field(None, description="the final state; implies final")
    message: str = Field("", max_length=2000)

    @property
    def is_final(self) -> bool:
        """Whether this update ends the task."""
        return self.final or self.state is not None


@router.get("", dependencies=READ)
async def list_tasks(
    tasks: ExportTasksDep,
    page: PageDep,
    sink: Annotated[str | None, Query(description="only this sink's tasks")] = None,
    state: Annotated[ExportState | None, Query(description="only tasks in this state")] = None,
) -> Page[ExportTask]:
    """Export tasks, oldest first."""
    return await tasks.query(sink, state, page)


@router.post(
    "/claim",
    dependencies=GATEWAY,
    response_model=ClaimedTask,
    responses={204: {"description": "no task of the sink is claimable now"}},
)
async def claim_task(
    body: ClaimRequest, tasks: ExportTasksDep, settings: SettingsDep
) -> ClaimedTask | Response:
    """Claim the oldest claimable task of a sink under a lease."""
    task = await tasks.claim(body.sink, body.owner, body.lease_s or settings.export.lease_s)
    if task is None or task.held_lease is None:
        return Response(status_code=204)
    return ClaimedTask(task=task, lease=task.held_lease)


@router.post("/{task_id}/lease", dependencies=GATEWAY)
async def extend_lease(
    task_id: TaskPath, body: LeaseExtension, tasks: ExportTasksDep, settings: SettingsDep
) -> Lease:
    """Extend the caller's live lease (409 when it does not hold one)."""
    task = await tasks.extend(task_id, body.owner, body.lease, body.lease_s or settings.export.lease_s)
    assert task.held_lease is not None  # extend returns the task only while the caller holds it
    return task.held_lease


@router.delete("/{task_id}/lease", status_code=204, dependencies=GATEWAY)
async def release_lease(
    task_id: TaskPath, tasks: ExportTasksDep, owner: Identifier, lease: Annotated[int, Query(ge=0)]
) -> Response:
    """Give the task back (pending, claimable by anyone) before the lease ends."""
    await tasks.release_lease(task_id, owner, lease)
    return Response(status_code=204)


@router.put("/{task_id}", dependencies=GATEWAY)
async def update_task(task_id: TaskPath, body: TaskUpdate, tasks: ExportTasksDep, bus: BusDep) -> ExportTask:
    """Report progress, or make the task final and publish its ``export.completed``."""
    if not body.is_final:
        return await tasks.report(task_id, body.owner, body.lease, body.file_results, body.message)
    final = await tasks.finish(task_id, body.owner, body.lease, body.file_results, body.state, body.message)
    await announce_completion(tasks, bus, final)
    return final


@router.get(
    "/{task_id}/files/{index}",
    dependencies=GATEWAY,
    response_class=StreamingResponse,
    responses={200: {"content": {"application/dicom": {}}, "description": "the file's bytes"}},
)
async def download_file(
    task_id: TaskPath,
    index: Annotated[int, Path(ge=0, description="the file's position in the task's files")],
    tasks: ExportTasksDep,
    objects: ObjectsDep,
) -> StreamingResponse:
    """Payload.Download: one file of the task, streamed from the object store."""
    task = await tasks.get(task_id)
    if index >= len(task.files):
        raise NotFound(f"export task {task_id!r} has {len(task.files)} files; no file {index}")
    file = task.files[index]
    chunks = objects.stream(file.key)
    first = await anext(chunks, b"")  # a missing object or a store outage is a problem, not a cut body
    name = file.key.rsplit("/", 1)[-1]
    return StreamingResponse(
        _prepend(first, chunks),
        media_type=file.content_type,
        headers={"Content-Disposition": f'attachment; filename="{name}"'},
    )


async def _prepend(first: bytes, rest: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """``first``, then ``rest``; ``rest`` is closed however the response ends."""
    try:
        if first:
            yield first
        async for chunk in rest:
            yield chunk
    finally:
        await rest.aclose()  # type: ignore[attr-defined]
