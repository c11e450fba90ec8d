"""RFC 7807 problem details for every error the API returns (``application/problem+json``).

A problem has ``type`` (``urn:mwm:problem:<slug>``), ``title``, ``status``, ``detail`` and ``instance``
(the request path); a validation problem adds ``errors``, a list of ``{"field", "message"}``. MWM's own
errors map to statuses here: `NotFound` 404, `Conflict` 409, `ValidationFailed` 422, `TransientError`
503; FastAPI's request validation errors and Starlette's HTTP errors (401, 403, 404, 405) take the same
shape, and anything unexpected is a 500 problem (and a logged bug).
"""

from __future__ import annotations

from collections.abc import Mapping
from http import HTTPStatus

import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException

from wm.errors import Conflict, NotFound, TransientError, ValidationFailed
from wm.registry import FieldError
from wm.registry.validation import field_path

PROBLEM_JSON = "application/problem+json"

_SLUGS = {401: "unauthorized", 403: "forbidden", 404: "not-found", 409: "conflict", 422: "validation-failed"}

log = structlog.get_logger(__name__)


class Problem(BaseModel):
    """The body of every error response."""

    type: str
    title: str
    status: int
    detail: str
    instance: str | None = None
    errors: list[dict[str, str]] | None = None


def problem(
    request: Request,
    status: int,
    detail: str,
    errors: list[FieldError] | None = None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    """A problem+json response."""
    phrase = HTTPStatus(status).phrase
    slug = _SLUGS.get(status, phrase.lower().replace(" ", "-"))
    body = Problem(
        type=f"urn:mwm:problem:{slug}",
        title=phrase,
        status=status,
        detail=detail,
        instance=request.url.path,
        errors=errors,
    )
    return JSONResponse(
        body.model_dump(exclude_none=True), status_code=status, headers=headers, media_type=PROBLEM_JSON
    )


async def _not_found(request: Request, exc: Exception) -> JSONResponse:
    return problem(request, 404, str(exc))


async def _conflict(request: Request, exc: Exception) -> JSONResponse:
    return problem(request, 409, str(exc))


async def _validation_failed(request: Request, exc: Exception) -> JSONResponse:
    errors = exc.errors if isinstance(exc, ValidationFailed) else []
    return problem(request, 422, f"{len(errors)} validation error(s)", errors)


async def _request_invalid(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = [{"field": _request_field(error["loc"]), "message": error["msg"]} for error in exc.errors()]
    return problem(request, 422, f"{len(errors)} validation error(s) in the request", errors)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    return problem(request, exc.status_code, str(exc.detail), headers=exc.headers)


async def _unavailable(request: Request, exc: Exception) -> JSONResponse:
    return problem(request, 503, str(exc), headers={"Retry-After": "5"})


async def _bug(request: Request, exc: Exception) -> JSONResponse:
    log.exception("api_request_failed", path=request.url.path, error=repr(exc))
    return problem(request, 500, "internal error; see the server log")


def _request_field(loc: tuple[int | str, ...]) -> str:
    """The body's fields relative to the body (``map.cpu``); query and path ones prefixed (``query.page``)."""
    return field_path(loc[1:] if loc and loc[0] == "body" else loc)


def install_problem_handlers(app: FastAPI) -> None:
    """Make every error response of ``app`` a problem."""
    app.add_exception_handler(NotFound, _not_found)
    app.add_exception_handler(Conflict, _conflict)
    app.add_exception_handler(ValidationFailed, _validation_failed)
    app.add_exception_handler(RequestValidationError, _request_invalid)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(TransientError, _unavailable)
    app.add_exception_handler(Exception, _bug)
