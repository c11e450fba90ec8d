"""``/sinks``: list, create (optionally checked with a C-ECHO), read and delete export sinks."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Response

from schemas.applications import DicomSinkArgs, SinkDefinition
from wm.api.deps import ADMIN, READ, PageDep, RegistryDep, SettingsDep
from wm.errors import ValidationFailed
from wm.registry import Page
from wm.registry.echo import echo as c_echo

router = APIRouter(prefix="/sinks", tags=["sinks"])


@router.get("", dependencies=READ)
async def list_sinks(registry: RegistryDep, page: PageDep) -> Page[SinkDefinition]:
    """Sinks by name."""
    return await registry.sinks.list_page(page)


@router.post("", status_code=201, dependencies=ADMIN)
async def create_sink(
    sink: SinkDefinition,
    registry: RegistryDep,
    settings: SettingsDep,
    echo: Annotated[
        bool, Query(description="refuse the sink (422) unless its peer answers a C-ECHO")
    ] = False,
) -> SinkDefinition:
    """Create an export sink (409 when the name is taken)."""
    if echo:
        await _check_echo(sink, settings.export.echo_timeout_s)
    return await registry.sinks.create(sink)


@router.get("/{name}", dependencies=READ)
async def get_sink(name: str, registry: RegistryDep) -> SinkDefinition:
    """One sink."""
    return await registry.sinks.get(name)


@router.delete("/{name}", status_code=204, dependencies=ADMIN)
async def delete_sink(name: str, registry: RegistryDep) -> Response:
    """Delete a sink (409 while an active application exports to it)."""
    await registry.delete_sink(name)
    return Response(status_code=204)


async def _check_echo(sink: SinkDefinition, timeout_s: float) -> None:
    if not isinstance(sink.args, DicomSinkArgs):
        raise ValidationFailed(
            [{"field": "echo", "message": f"a C-ECHO check needs a dicom sink, not {sink.type}"}]
        )
    failure = await c_echo(sink.args, timeout_s)
    if failure is not None:
        raise ValidationFailed([{"field": "args", "message": failure}])
