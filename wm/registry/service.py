"""The registry: applications, sinks and AE title mappings, with validation and cross-references.

This is what the API (and the discovery consumer, through `Registry.applications_for`) uses. It holds the
rules that span stores: a definition is validated in full before it is stored, registering an application
maps its ``ae_titles`` (adding links, never removing ones made with ``map``), deleting an application
removes its AE title links, a sink used by an active application cannot be deleted, and only an active
application can be mapped. Without transactions these rules are checked, then written: a sink deleted at
the very moment an application naming it is registered can slip through, so exporters treat a missing
sink as a permanent failure.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from schemas.applications import AeTitleMapping, ApplicationDefinition, CallingPeer
from wm.adapters.mongo import Database
from wm.errors import Conflict, ValidationFailed
from wm.registry.aetitles import AeTitles
from wm.registry.applications import Applications
from wm.registry.models import ApplicationRevision, FieldError
from wm.registry.sinks import Sinks
from wm.registry.validation import EngineValidator, validate_definition

RawDefinition = Mapping[str, Any] | ApplicationDefinition


class Registry:
    """Applications, sinks and AE title mappings over one database.

    ``engine_validator`` is needed only to validate (register, revise); consumers that only read may omit it.
    """

    def __init__(self, database: Database, engine_validator: EngineValidator | None = None) -> None:
        self.applications = Applications(database)
        self.sinks = Sinks(database)
        self.ae_titles = AeTitles(database)
        self._engine_validator = engine_validator

    async def revision(self, name: str, revision: int) -> ApplicationRevision:
        """One revision of an application, deleted or not (``NotFound`` if it never existed)."""
        return await self.applications.revision(name, revision)

    async def validate(self, data: RawDefinition) -> tuple[ApplicationDefinition | None, list[FieldError]]:
        """The parsed definition (None when the schema fails) and every problem found."""
        if self._engine_validator is None:
            raise RuntimeError("this Registry was built without an engine validator and cannot validate")
        raw = data.model_dump() if isinstance(data, ApplicationDefinition) else data
        return await validate_definition(raw, self.sinks, self._engine_validator)

    async def register(self, data: RawDefinition) -> ApplicationRevision:
        """Validate and store revision 1 (or the next revision of a deleted name), then map its AE titles."""
        definition = await self._valid(data)
        revision = await self.applications.register(definition)
        await self._map_own_titles(definition)
        return revision

    async def new_revision(self, name: str, data: RawDefinition) -> ApplicationRevision:
        """Validate and store the next revision of the active application ``name``."""
        definition = await self._valid(data)
        if definition.name != name:
            raise ValidationFailed([{"field": "name", "message": f"must be {name!r}, the name in the path"}])
        revision = await self.applications.new_revision(definition)
        await self._map_own_titles(definition)
        return revision

    async def delete_application(self, name: str) -> None:
        """Soft-delete the application and remove its AE title links: it triggers nothing any more."""
        await self.applications.delete(name)
        await self.ae_titles.forget_application(name)

    async def delete_sink(self, name: str) -> None:
        """Delete a sink no active application exports to; ``Conflict`` naming the users otherwise."""
        await self.sinks.get(name)
        users = await self.applications.using_sink(name)
        if users:
            raise Conflict(f"sink {name!r} is used by application(s) {', '.join(users)}; update them first")
        await self.sinks.delete(name)

    async def map(
        self, ae_title: str, application: str, allowed_callers: Sequence[CallingPeer] = ()
    ) -> AeTitleMapping:
        """Make ``ae_title`` trigger the active ``application`` (and allow ``allowed_callers``)."""
        await self.applications.latest(application)
        await self.ae_titles.map(ae_title, application, allowed_callers)
        return await self.ae_titles.get(ae_title)

    async def unmap(self, ae_title: str, application: str) -> AeTitleMapping:
        """Stop ``ae_title`` triggering ``application``."""
        await self.ae_titles.unmap(ae_title, application)
        return await self.ae_titles.get(ae_title)

    async def replace_mapping(self, mapping: AeTitleMapping) -> AeTitleMapping:
        """Replace the mapping of ``mapping.ae_title``; every application must be active."""
        active = {app.name for app in await self.applications.latest_of(mapping.applications)}
        errors = [
            {"field": f"applications[{i}]", "message": f"unknown application {name!r}"}
            for i, name in enumerate(mapping.applications)
            if name not in active
        ]
        if errors:
            raise ValidationFailed(errors)
        await self.ae_titles.replace(mapping)
        return await self.ae_titles.get(mapping.ae_title)

    async def mapping(self, ae_title: str) -> AeTitleMapping | None:
        """The mapping of ``ae_title`` (allow-list included), or None when it is not mapped."""
        return await self.ae_titles.find(ae_title)

    async def applications_for(self, called_ae_title: str) -> list[ApplicationRevision]:
        """The latest active revision of each application ``called_ae_title`` triggers (two queries)."""
        return await self.applications.latest_of(await self.ae_titles.applications(called_ae_title))

    async def _valid(self, data: RawDefinition) -> ApplicationDefinition:
        definition, errors = await self.validate(data)
        if errors or definition is None:
            raise ValidationFailed(errors)
        return definition

    async def _map_own_titles(self, definition: ApplicationDefinition) -> None:
        for ae_title in definition.ae_titles:
            await self.ae_titles.map(ae_title, definition.name)
