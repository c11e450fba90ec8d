"""Validation of an application definition: every error at once, each naming its field.

Four kinds of check, all run so that one round trip shows everything that is wrong: the schema
(pydantic), cross-references (every sink exists), rules across fields (a MAP needs an image or a command;
the argo engine needs its options) and the engine plugin's own ``validate``. The engine is reached
through an `EngineValidator`, a port, so tests can stand in for an engine that is not installed.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Protocol

from pydantic import ValidationError

from schemas.applications import UNION_TAGS, ApplicationDefinition
from wm.config import Settings
from wm.engines import available_engines, load_engine
from wm.errors import PermanentError
from wm.registry.models import FieldError

EngineValidator = Callable[[ApplicationDefinition], Awaitable[list[str]]]
"""The engine's own check of an application: its problems as messages (empty when it can run)."""


class UnknownEngine(PermanentError):
    """The application names an engine that is not installed."""


class SinkNames(Protocol):
    """What validation needs from the sink store."""

    async def existing(self, names: Sequence[str]) -> set[str]:
        """Which of ``names`` are registered sinks."""
        ...


def engine_validator(settings: Settings) -> EngineValidator:
    """The default `EngineValidator`: the installed engine plugin named by the application."""

    async def validate(application: ApplicationDefinition) -> list[str]:
        try:
            engine = load_engine(application.engine.name, settings)
        except PermanentError as exc:
            raise UnknownEngine(str(exc)) from exc
        return await engine.validate(application)

    return validate


async def validate_definition(
    data: Mapping[str, Any], sinks: SinkNames, engine: EngineValidator
) -> tuple[ApplicationDefinition | None, list[FieldError]]:
    """Parse and check a raw definition: the model (None when the schema fails) and every error found."""
    try:
        definition = ApplicationDefinition.model_validate(data)
    except ValidationError as exc:
        errors = schema_errors(exc) + await _unknown_sinks(data.get("sinks"), sinks)
        return None, errors + _unknown_engine_name(data, errors)
    return definition, await validate_application(definition, sinks, engine)


def _unknown_engine_name(data: Mapping[str, Any], errors: list[FieldError]) -> list[FieldError]:
    """With the schema failing elsewhere, the engine plugin cannot check the model: still say if the
    engine it names is not installed, so one round trip lists that too."""
    engine = data.get("engine")
    name = engine.get("name") if isinstance(engine, Mapping) else None
    if not isinstance(name, str) or any(error["field"].startswith("engine.name") for error in errors):
        return []
    installed = available_engines()
    if name in installed:
        return []
    return [
        {
            "field": "engine.name",
            "message": f"unknown engine {name!r}; installed: {', '.join(installed) or 'none'}",
        }
    ]


async def validate_application(
    definition: ApplicationDefinition, sinks: SinkNames, engine: EngineValidator
) -> list[FieldError]:
    """Every problem of a schema-valid definition: unknown sinks, cross-field rules, engine check."""
    errors = await _unknown_sinks(definition.sinks, sinks)
    errors += _cross_field_errors(definition)
    try:
        errors += [{"field": "engine", "message": message} for message in await engine(definition)]
    except UnknownEngine as exc:
        errors.append({"field": "engine.name", "message": str(exc)})
    return errors


def schema_errors(exc: ValidationError) -> list[FieldError]:
    """Pydantic's errors as field errors, fields written ``map.cpu`` or ``sinks[1]``."""
    return [{"field": field_path(error["loc"]), "message": error["msg"]} for error in exc.errors()]


def field_path(loc: Sequence[int | str]) -> str:
    """``("sinks", 1)`` -> ``sinks[1]``; ``("map", "cpu")`` -> ``map.cpu``; ``()`` -> ``(root)``."""
    path = ""
    for part in loc:
        if part in UNION_TAGS:
            continue  # which member of a union (``DicomSinkArgs``): a model's name, not a field's
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path or "(root)"


async def _unknown_sinks(names: object, sinks: SinkNames) -> list[FieldError]:
    if not isinstance(names, list):
        return []
    wanted = [name for name in names if isinstance(name, str)]
    known = await sinks.existing(wanted)
    return [
        {"field": f"sinks[{i}]", "message": f"unknown sink {name!r}; create it first"}
        for i, name in enumerate(names)
        if isinstance(name, str) and name not in known
    ]


def _cross_field_errors(definition: ApplicationDefinition) -> list[FieldError]:
    errors: list[FieldError] = []
    if not definition.map.image and not definition.map.command:
        errors.append({"field": "map", "message": "a MAP needs an image or a command"})
    if definition.engine.name == "argo" and definition.engine.argo is None:
        errors.append({"field": "engine.argo", "message": "the argo engine needs engine.argo options"})
    if definition.engine.name != "argo" and definition.engine.argo is not None:
        errors.append({"field": "engine.argo", "message": f"not used by the {definition.engine.name} engine"})
    return errors
