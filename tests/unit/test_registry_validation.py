"""Validation of application definitions on fakes: every error at once, each naming its field."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from schemas.applications import ApplicationDefinition
from wm.registry import UnknownEngine, validate_application, validate_definition
from wm.registry.validation import field_path


class FakeSinks:
    def __init__(self, *names: str) -> None:
        self.names = set(names)

    async def existing(self, names: Sequence[str]) -> set[str]:
        return self.names & set(names)


async def engine_ok(application: ApplicationDefinition) -> list[str]:
    return []


async def engine_complains(application: ApplicationDefinition) -> list[str]:
    return [f"image {application.map.image} cannot be resolved"]


async def engine_unknown(application: ApplicationDefinition) -> list[str]:
    raise UnknownEngine(f"unknown engine {application.engine.name!r}; installed: none")


def definition(**changes: Any) -> dict[str, Any]:
    return {"name": "liver-seg", "version": "1.0", "map": {"image": "liver:1"}, **changes}


async def test_a_valid_definition_has_no_errors() -> None:
    parsed, errors = await validate_definition(definition(sinks=["pacs"]), FakeSinks("pacs"), engine_ok)
    assert errors == []
    assert parsed is not None and parsed.sinks == ["pacs"]


async def test_every_error_is_reported_with_its_field() -> None:
    data = definition(sinks=["pacs", "archive", "nowhere"], map={"image": "liver:1"}, engine={"name": "argo"})
    _, errors = await validate_definition(data, FakeSinks("pacs"), engine_complains)
    assert {"field": "sinks[1]", "message": "unknown sink 'archive'; create it first"} in errors
    assert {"field": "sinks[2]", "message": "unknown sink 'nowhere'; create it first"} in errors
    assert {"field": "engine.argo", "message": "the argo engine needs engine.argo options"} in errors
    assert {"field": "engine", "message": "image liver:1 cannot be resolved"} in errors
    assert len(errors) == 4


async def test_schema_errors_and_unknown_sinks_come_together() -> None:
    data = definition(
        map={"cpu": -1}, discovery={"grouping_tag": "0000,0000"}, sinks=["nowhere"], colour="red"
    )
    parsed, errors = await validate_definition(data, FakeSinks(), engine_ok)
    assert parsed is None
    fields = [error["field"] for error in errors]
    assert set(fields) == {"map.cpu", "discovery.grouping_tag", "colour", "sinks[0]"}


async def test_a_map_needs_an_image_or_a_command() -> None:
    parsed = ApplicationDefinition.model_validate(definition(map={}))
    errors = await validate_application(parsed, FakeSinks(), engine_ok)
    assert errors == [{"field": "map", "message": "a MAP needs an image or a command"}]


async def test_an_unknown_engine_is_an_error_on_engine_name() -> None:
    parsed = ApplicationDefinition.model_validate(definition(engine={"name": "nosuch"}))
    errors = await validate_application(parsed, FakeSinks(), engine_unknown)
    assert errors == [{"field": "engine.name", "message": "unknown engine 'nosuch'; installed: none"}]


def test_field_paths_read_like_the_definition() -> None:
    assert field_path(("sinks", 1)) == "sinks[1]"
    assert field_path(("map", "environment", "X")) == "map.environment.X"
    assert field_path(()) == "(root)"
