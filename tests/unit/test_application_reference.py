"""docs/application-definition.md is generated from the model: it must be what the generator prints."""

from __future__ import annotations

from devkit.services import REPO
from schemas.applications import ApplicationDefinition
from schemas.reference import application_reference


def test_the_reference_matches_the_model() -> None:
    written = (REPO / "docs" / "application-definition.md").read_text()
    assert written == application_reference(), (
        "regenerate it: python -m schemas.reference > docs/application-definition.md"
    )


def test_every_field_is_listed_with_a_meaning() -> None:
    rows = [line for line in application_reference().splitlines() if line.startswith("| `")]
    fields = {row.split("`")[1] for row in rows}
    assert {"name", "map.image", "discovery.filters.modalities", "engine.argo.namespace"} <= fields
    assert len(rows) >= len(ApplicationDefinition.model_fields)
    assert not [row for row in rows if row.endswith("|  |")], "a field without a description"
