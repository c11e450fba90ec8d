"""The CLI's HTTP access to the REST API: one request, or every item of a paged listing.

Requests go to ``MWM_API__URL`` with the bearer key ``MWM_API__TOKEN``; a command's ``--api-url`` and
``--token`` override them. An error answer prints the problem's detail and every validation error with its
field, and exits 1; an unreachable API exits 1 too.
"""

from __future__ import annotations

import asyncio
from typing import Annotated, Any, NoReturn
from urllib.parse import quote

import httpx
import typer

from wm.config import Settings

ApiUrl = Annotated[str | None, typer.Option("--api-url", help="API base URL [default: MWM_API__URL]")]
Token = Annotated[str | None, typer.Option("--token", help="API key [default: MWM_API__TOKEN]")]

NO_TOKEN = "no API key: set MWM_API__TOKEN or pass --token"
PAGE_SIZE = 200


def fail(message: str) -> NoReturn:
    """Print ``message`` to stderr and exit 1."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(1)


def require_token(token: str | None, settings: Settings) -> str:
    """The API key to send; exit 1 with what to do when there is none (every route but health needs one)."""
    chosen = token or settings.api.token
    if not chosen:
        fail(NO_TOKEN)
    return chosen


def segment(value: str) -> str:
    """``value`` quoted as one URL path segment."""
    return quote(value, safe="")


def call(api_url: str | None, token: str | None, method: str, path: str, **kwargs: Any) -> Any:
    """One API request; the JSON answer (None for 204), or exit 1 with the problem printed."""
    settings = Settings()
    base = (api_url or settings.api.url).rstrip("/")
    headers = {"Authorization": f"Bearer {require_token(token, settings)}"}
    try:
        response = asyncio.run(_send(method, base + path, headers, kwargs, settings.api.client_timeout_s))
    except httpx.TransportError as exc:
        fail(f"cannot reach the MWM API at {base}: {exc or type(exc).__name__}")
    if response.is_error:
        _print_problem(response)
    return None if response.status_code == 204 else response.json()


async def _send(
    method: str, url: str, headers: dict[str, str], kwargs: dict[str, Any], timeout_s: float
) -> httpx.Response:
    async with httpx.AsyncClient(timeout=timeout_s) as client:
        return await client.request(method, url, headers=headers, **kwargs)


def _print_problem(response: httpx.Response) -> NoReturn:
    try:
        body = response.json()
    except ValueError:
        body = {}
    if not isinstance(body, dict):
        body = {}
    title = body.get("title", response.reason_phrase)
    typer.echo(f"error: {title} ({response.status_code}): {body.get('detail', response.text)}", err=True)
    for error in body.get("errors") or []:
        typer.echo(f"  {error.get('field')}: {error.get('message')}", err=True)
    raise typer.Exit(1)


def all_items(
    api_url: str | None, token: str | None, path: str, params: dict[str, Any] | None = None
) -> list[dict[str, Any]]:
    """Every item of a paged listing (``params`` filter it)."""
    items: list[dict[str, Any]] = []
    page = 1
    while True:
        query = {**(params or {}), "page": page, "page_size": PAGE_SIZE}
        answer = call(api_url, token, "GET", path, params=query)
        items += answer["items"]
        if len(items) >= answer["total"] or not answer["items"]:
            return items
        page += 1
