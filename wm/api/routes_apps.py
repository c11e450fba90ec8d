"""``/apps``: validate, register, list, read, revise and delete applications.

Definitions are read as raw JSON (not parsed by FastAPI) so that schema errors, unknown sinks and engine
errors come back together in one 422 problem; the OpenAPI document still shows the definition schema.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, Response
from pydantic import BaseModel

from wm.api.deps import ADMIN, READ, PageDep, RegistryDep
from wm.errors import ValidationFailed
from wm.registry import ApplicationRevision, FieldError, Page

router = APIRouter(prefix="/apps", tags=["applications"])

_DEFINITION_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ApplicationDefinition"}}},
    }
}


class ValidationReport(BaseModel):
    """The outcome of ``POST /apps/validate``."""

    valid: bool
    errors: list[FieldError]


async def definition_body(request: Request) -> dict[str, Any]:
    """The request body as a JSON object (a 422 problem when it is not one)."""
    try:
        data = json.loads(await request.body())
    except ValueError as exc:
        raise ValidationFailed([{"field": "(body)", "message": f"not JSON: {exc}"}]) from exc
    if not isinstance(data, dict):
        raise ValidationFailed([{"field": "(body)", "message": "must be a JSON object"}])
    return data


Definition = Annotated[dict[str, Any], Depends(definition_body)]


@router.post("/validate", dependencies=READ, openapi_extra=_DEFINITION_BODY)
async def validate_app(definition: Definition, registry: RegistryDep) -> ValidationReport:
    """Check a definition without storing it: every error, each naming its field."""
    _, errors = await registry.validate(definition)
    return ValidationReport(valid=not errors, errors=errors)


@router.get("", dependencies=READ)
async def list_apps(registry: RegistryDep, page: PageDep) -> Page[ApplicationRevision]:
    """The latest active revision of each application, by name."""
    return await registry.applications.list_page(page)


@router.post("", status_code=201, dependencies=ADMIN, openapi_extra=_DEFINITION_BODY)
async def register_app(definition: Definition, registry: RegistryDep) -> ApplicationRevision:
    """Register a new application (revision 1; 409 when the name is taken)."""
    return await registry.register(definition)


@router.get("/{name}", dependencies=READ)
async def get_app(name: str, registry: RegistryDep) -> ApplicationRevision:
    """The latest active revision of an application."""
    return await registry.applications.latest(name)


@router.get("/{name}/revisions/{revision}", dependencies=READ)
async def get_app_revision(name: str, revision: int, registry: RegistryDep) -> ApplicationRevision:
    """One revision of an application, even a deleted one."""
    return await registry.applications.revision(name, revision)


@router.put("/{name}", status_code=201, dependencies=ADMIN, openapi_extra=_DEFINITION_BODY)
async def revise_app(name: str, definition: Definition, registry: RegistryDep) -> ApplicationRevision:
    """Store a new revision of an active application; it is the one new data triggers."""
    return await registry.new_revision(name, definition)


@router.delete("/{name}", status_code=204, dependencies=ADMIN)
async def delete_app(name: str, registry: RegistryDep) -> Response:
    """Soft-delete an application: it triggers nothing more; its revisions stay readable."""
    await registry.delete_application(name)
    return Response(status_code=204)
