"""``mwm jobs``: list, show, cancel, retry and watch jobs through the REST API (see `wm.cli.http`).

``watch ID`` polls the job every ``--interval`` seconds, prints a line each time its state changes and
exits when the job ended: 0 if it succeeded, 1 otherwise. ``watch`` without an ID redraws a table of the
jobs that have not ended until interrupted (Ctrl-C).
"""

from __future__ import annotations

import json
import sys
import time
from datetime import UTC, datetime
from typing import Annotated, Any

import typer

from wm.cli.http import ApiUrl, Token, call, segment
from wm.cli.output import Output, OutputFormat, emit
from wm.domain.jobs import TERMINAL, JobState

jobs_app = typer.Typer(help="Jobs: list, show, cancel, retry, watch.", no_args_is_help=True)

COLUMNS = ["id", "application", "state", "engine", "created_at", "finished_at", "message"]
ACTIVE = [state for state in JobState if state not in TERMINAL]
MAX_PAGE_SIZE = 200
CLEAR_SCREEN = "\x1b[H\x1b[2J"

Interval = Annotated[float, typer.Option("--interval", min=0.1, help="seconds between polls")]


def _row(job: dict[str, Any]) -> dict[str, Any]:
    return {
        **job,
        "application": f"{job['application_id']}@{job['application_revision']}",
        "message": job["message"] or None,
    }


def _page(api_url: str | None, token: str | None, limit: int, **filters: str | None) -> list[dict[str, Any]]:
    params = {key: value for key, value in filters.items() if value}
    answer = call(api_url, token, "GET", "/jobs", params={**params, "page_size": limit})
    items: list[dict[str, Any]] = answer["items"]
    return items


def _job(api_url: str | None, token: str | None, job_id: str) -> dict[str, Any]:
    found: dict[str, Any] = call(api_url, token, "GET", f"/jobs/{segment(job_id)}")
    return found


@jobs_app.command("list")
def jobs_list(
    state: Annotated[JobState | None, typer.Option("--state", help="only jobs in this state")] = None,
    application: Annotated[str | None, typer.Option("--application", help="only this application")] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, max=MAX_PAGE_SIZE, help="newest N jobs")] = 50,
    api_url: ApiUrl = None,
    token: Token = None,
    output: Output = OutputFormat.table,
) -> None:
    """The newest jobs first."""
    items = _page(api_url, token, limit, state=state, application=application)
    emit(items if output is OutputFormat.json else [_row(item) for item in items], COLUMNS, output)


@jobs_app.command("show")
def jobs_show(
    job_id: str, api_url: ApiUrl = None, token: Token = None, output: Output = OutputFormat.table
) -> None:
    """One job, with its outputs."""
    job = _job(api_url, token, job_id)
    if output is OutputFormat.json:
        typer.echo(json.dumps(job, indent=2))
        return
    for key, value in job.items():
        if key not in ("outputs", "attempts"):
            typer.echo(f"{key}: {'-' if value in (None, '') else value}")
    for earlier in job.get("attempts", []):
        ended = earlier["message"] or "-"
        typer.echo(f"attempt {earlier['attempt']}: {earlier['state']} at {earlier['finished_at']}: {ended}")
    typer.echo(f"outputs: {len(job['outputs'])}")
    for ref in job["outputs"]:
        typer.echo(f"  {ref['key']} ({ref['size']} bytes)")


@jobs_app.command("cancel")
def jobs_cancel(job_id: str, api_url: ApiUrl = None, token: Token = None) -> None:
    """Ask for a job to be cancelled (the monitor stops it on its engine); exit 1 if it already ended."""
    job = call(api_url, token, "POST", f"/jobs/{segment(job_id)}/cancel")
    typer.echo(f"cancellation of job {job['id']} requested (it is {job['state']})")


@jobs_app.command("retry")
def jobs_retry(job_id: str, api_url: ApiUrl = None, token: Token = None) -> None:
    """Run a failed, timed-out or cancelled job again on its staged inputs (a new attempt)."""
    job = call(api_url, token, "POST", f"/jobs/{segment(job_id)}/retry")
    typer.echo(
        f"job {job['id']} retried: attempt {job['attempt']} is {job['state']} ({job['engine_job_id']})"
    )


@jobs_app.command("watch")
def jobs_watch(
    job_id: Annotated[
        str | None, typer.Argument(help="follow this job; without it, every active job")
    ] = None,
    interval: Interval = 1.0,
    api_url: ApiUrl = None,
    token: Token = None,
) -> None:
    """Follow a job until it ends (exit 0 if it succeeded), or show the active jobs until Ctrl-C."""
    if job_id is None:
        _watch_active(api_url, token, interval)
        return
    final = _follow(api_url, token, job_id, interval)
    if final["state"] != JobState.succeeded:
        raise typer.Exit(1)


def _follow(api_url: str | None, token: str | None, job_id: str, interval: float) -> dict[str, Any]:
    """Print each state the job is seen in; return the job once it ended."""
    seen: str | None = None
    while True:
        job = _job(api_url, token, job_id)
        if job["state"] != seen:
            seen = job["state"]
            detail = f"  {job['message']}" if job["message"] else ""
            typer.echo(f"{job['updated_at']}  {job['id']}  {seen}{detail}")
        if seen in TERMINAL:
            return job
        time.sleep(interval)


def _watch_active(api_url: str | None, token: str | None, interval: float) -> None:
    """Redraw the table of jobs that have not ended every ``interval`` seconds until Ctrl-C."""
    try:
        while True:
            rows = [row for state in ACTIVE for row in _page(api_url, token, MAX_PAGE_SIZE, state=state)]
            rows.sort(key=lambda row: str(row["created_at"]), reverse=True)
            _clear_screen()
            typer.echo(f"jobs not ended, {datetime.now(UTC):%Y-%m-%d %H:%M:%S} UTC (Ctrl-C to stop)")
            emit([_row(row) for row in rows], COLUMNS, OutputFormat.table)
            time.sleep(interval)
    except KeyboardInterrupt:
        typer.echo("")


def _clear_screen() -> None:
    """Clear a terminal (output to a pipe or file is appended instead)."""
    if sys.stdout.isatty():
        typer.echo(CLEAR_SCREEN, nl=False)
