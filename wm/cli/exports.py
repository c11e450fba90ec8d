"""``mwm exports``: list export tasks, show one with its per-file results, retry a failed one (REST API).

``retry ID`` reopens a ``failed`` or ``partial`` task: only its failed files are sent again (exit 1 with the
API's reason for a task in any other state).
"""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

from wm.cli.http import ApiUrl, Token, call, segment
from wm.cli.output import Output, OutputFormat, emit
from wm.domain.exports import ExportState

exports_app = typer.Typer(help="Export tasks: list, show, retry.", no_args_is_help=True)

COLUMNS = ["id", "sink", "state", "files", "failed", "retries", "completed_at", "message"]
RESULT_COLUMNS = ["key", "status", "error"]
MAX_PAGE_SIZE = 200


def _row(task: dict[str, Any]) -> dict[str, Any]:
    results = task["file_results"]
    return {
        "id": task["export_task_id"],
        "sink": task["sink"]["name"],
        "state": task["state"],
        "files": len(task["files"]),
        "failed": sum(1 for result in results if result["status"] == "failed"),
        "retries": task["retries"],
        "completed_at": task["completed_at"],
        "message": task["message"] or None,
    }


@exports_app.command("list")
def exports_list(
    sink: Annotated[str | None, typer.Option("--sink", help="only this sink's tasks")] = None,
    state: Annotated[ExportState | None, typer.Option("--state", help="only tasks in this state")] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, max=MAX_PAGE_SIZE, help="at most N tasks")] = 50,
    api_url: ApiUrl = None,
    token: Token = None,
    output: Output = OutputFormat.table,
) -> None:
    """Export tasks, oldest first."""
    params = {key: value for key, value in {"sink": sink, "state": state}.items() if value}
    items: list[dict[str, Any]] = call(
        api_url, token, "GET", "/exports", params={**params, "page_size": limit}
    )["items"]
    emit(items if output is OutputFormat.json else [_row(item) for item in items], COLUMNS, output)


@exports_app.command("show")
def exports_show(
    task_id: str, api_url: ApiUrl = None, token: Token = None, output: Output = OutputFormat.table
) -> None:
    """One task and the result of each of its files."""
    task: dict[str, Any] = call(api_url, token, "GET", f"/exports/{segment(task_id)}")
    if output is OutputFormat.json:
        typer.echo(json.dumps(task, indent=2))
        return
    for key, value in _row(task).items():
        typer.echo(f"{key}: {'-' if value in (None, '') else value}")
    typer.echo(f"retry_at: {task['retry_at'] or '-'}")
    emit(task["file_results"], RESULT_COLUMNS, OutputFormat.table)


@exports_app.command("retry")
def exports_retry(task_id: str, api_url: ApiUrl = None, token: Token = None) -> None:
    """Send a failed or partial task's failed files again."""
    task = call(api_url, token, "POST", f"/exports/{segment(task_id)}/retry")
    failed = len(task["files"]) - len(task["file_results"])
    typer.echo(f"export task {task['export_task_id']} retried: {failed} file(s) to send again")
