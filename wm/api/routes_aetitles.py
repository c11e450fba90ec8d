"""``/aetitles``: which applications an AE title triggers, and who may send to it."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body, Path
from pydantic import BaseModel, Field

from schemas.applications import AeTitleMapping, CallingPeer
from schemas.events import AeTitle
from wm.api.deps import ADMIN, GATEWAY_READ, PageDep, RegistryDep
from wm.errors import ValidationFailed
from wm.registry import Page

router = APIRouter(prefix="/aetitles", tags=["AE titles"])

AeTitlePath = Annotated[AeTitle, Path(description="the called AE title")]


class MapRequest(BaseModel):
    """Optional body of ``POST /aetitles/{aet}/applications/{name}``."""

    allowed_callers: list[CallingPeer] = Field(default_factory=list, description="added to the allow-list")


@router.put("/{aet}", dependencies=ADMIN)
async def replace_mapping(aet: AeTitlePath, mapping: AeTitleMapping, registry: RegistryDep) -> AeTitleMapping:
    """Create or replace the mapping of an AE title (its applications and allow-list)."""
    if mapping.ae_title != aet:
        raise ValidationFailed(
            [{"field": "ae_title", "message": f"must be {aet!r}, the AE title in the path"}]
        )
    return await registry.replace_mapping(mapping)


@router.post("/{aet}/applications/{name}", dependencies=ADMIN)
async def map_application(
    aet: AeTitlePath, name: str, registry: RegistryDep, body: Annotated[MapRequest | None, Body()] = None
) -> AeTitleMapping:
    """Make the AE title trigger the application (and allow the given callers)."""
    return await registry.map(aet, name, body.allowed_callers if body else ())


@router.delete("/{aet}/applications/{name}", dependencies=ADMIN)
async def unmap_application(aet: AeTitlePath, name: str, registry: RegistryDep) -> AeTitleMapping:
    """Stop the AE title triggering the application."""
    return await registry.unmap(aet, name)


@router.get("", dependencies=GATEWAY_READ)
async def list_mappings(registry: RegistryDep, page: PageDep) -> Page[AeTitleMapping]:
    """Mappings by AE title."""
    return await registry.ae_titles.list_page(page)


@router.get("/{aet}", dependencies=GATEWAY_READ)
async def get_mapping(aet: AeTitlePath, registry: RegistryDep) -> AeTitleMapping:
    """The mapping of one AE title."""
    return await registry.ae_titles.get(aet)
