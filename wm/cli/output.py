"""Output for people (aligned tables) or scripts (``--output json``)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from enum import StrEnum
from typing import Annotated, Any

import typer


class OutputFormat(StrEnum):
    """How a command prints its result."""

    table = "table"
    json = "json"


Output = Annotated[OutputFormat, typer.Option("--output", "-o", help="table or json")]
"""The ``--output`` option of a command that prints a result."""


def emit(rows: Sequence[Mapping[str, Any]], columns: Sequence[str], output: OutputFormat) -> None:
    """Print rows as JSON or as a table of the given columns."""
    if output is OutputFormat.json:
        typer.echo(json.dumps(list(rows), indent=2, default=str))
        return
    if not rows:
        typer.echo("(none)")
        return
    cells = [[_cell(row.get(column)) for column in columns] for row in rows]
    widths = [max(len(column), *(len(line[i]) for line in cells)) for i, column in enumerate(columns)]
    typer.echo("  ".join(column.upper().ljust(width) for column, width in zip(columns, widths, strict=True)))
    for line in cells:
        typer.echo("  ".join(value.ljust(width) for value, width in zip(line, widths, strict=True)))


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, list | tuple):
        return ",".join(_one_line(str(item)) for item in value)
    return _one_line(str(value))


def _one_line(text: str) -> str:
    # A table keeps one row per item: a multi-line value (a job's error message) is joined with " / ".
    lines = [line.strip() for line in text.splitlines()]
    return " / ".join(line for line in lines if line) if len(lines) > 1 else text
