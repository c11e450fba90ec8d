"""``/exports/{id}`` for operators: read one task with its per-file results, and retry a failed one.

``GET /exports/{id}`` (read) shows a task: its state, every file's result, its redeliveries while the
destination was unavailable (``retries``, ``retry_at``) and the operator's retries (``reruns``).
``POST /exports/{id}/retry`` (admin) reopens a ``failed`` or ``partial`` task and requests it again: only the
files that failed are sent (`wm.stores.export_retry`); 409 for a task in any other state. The list is
``GET /exports`` (`wm.api.routes_exports`).
"""

from __future__ import annotations

from fastapi import APIRouter, Request

from wm.api.deps import ADMIN, READ, BusDep, ExportTasksDep
from wm.api.routes_exports import TaskPath
from wm.domain.exports import ExportTask
from wm.stores.export_retry import ExportRetries

router = APIRouter(prefix="/exports", tags=["exports"])


@router.get("/{task_id}", dependencies=READ)
async def get_task(task_id: TaskPath, tasks: ExportTasksDep) -> ExportTask:
    """One export task with its per-file results."""
    return await tasks.get(task_id)


@router.post("/{task_id}/retry", status_code=202, dependencies=ADMIN)
async def retry_task(task_id: TaskPath, request: Request, bus: BusDep) -> ExportTask:
    """Send a failed or partial task's failed files again (the exporter, or a pull client, takes it)."""
    return await ExportRetries(request.app.state.database).reopen(task_id, bus)
