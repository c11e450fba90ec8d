"""``mwm apps``, ``mwm sinks`` and ``mwm aet``: the registry through the REST API.

Each command sends one or a few HTTP requests to the API through `wm.cli.http` (``MWM_API__URL``,
``MWM_API__TOKEN``, or ``--api-url`` and ``--token``). Errors print the problem's detail and every
validation error with its field, and exit 1; usage errors exit 2.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml

from wm.cli.http import ApiUrl, Token, all_items, call, segment
from wm.cli.output import Output, OutputFormat, emit

apps_app = typer.Typer(
    help="Applications: validate, register, update, list, show, delete.", no_args_is_help=True
)
sinks_app = typer.Typer(help="Export sinks: create, list, delete.", no_args_is_help=True)
aet_app = typer.Typer(help="AE title mappings: map, unmap, list.", no_args_is_help=True)

DefinitionFile = Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="YAML or JSON definition")]


def load_definition(path: Path) -> dict[str, Any]:
    """A YAML or JSON file holding one object."""
    try:
        text = path.read_text()
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (OSError, ValueError, yaml.YAMLError) as exc:
        raise typer.BadParameter(f"cannot read {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise typer.BadParameter(f"{path} must hold one object (a mapping)")
    return data


def _app_row(item: dict[str, Any]) -> dict[str, Any]:
    definition = item["definition"]
    return {
        "name": item["name"],
        "revision": item["revision"],
        "version": definition["version"],
        "engine": definition["engine"]["name"],
        "ae_titles": definition["ae_titles"],
        "sinks": definition["sinks"],
    }


@apps_app.command("validate")
def apps_validate(file: DefinitionFile, api_url: ApiUrl = None, token: Token = None) -> None:
    """Check a definition without registering it; exit 1 listing every error."""
    report = call(api_url, token, "POST", "/apps/validate", json=load_definition(file))
    if not report["valid"]:
        typer.echo(f"{file}: {len(report['errors'])} error(s)", err=True)
        for error in report["errors"]:
            typer.echo(f"  {error['field']}: {error['message']}", err=True)
        raise typer.Exit(1)
    typer.echo(f"{file}: valid")


@apps_app.command("register")
def apps_register(file: DefinitionFile, api_url: ApiUrl = None, token: Token = None) -> None:
    """Register a new application from a definition file."""
    revision = call(api_url, token, "POST", "/apps", json=load_definition(file))
    typer.echo(f"registered {revision['name']} revision {revision['revision']}")


@apps_app.command("update")
def apps_update(file: DefinitionFile, api_url: ApiUrl = None, token: Token = None) -> None:
    """Store a new revision of an application from a definition file."""
    definition = load_definition(file)
    name = definition.get("name")
    if not isinstance(name, str) or not name:
        raise typer.BadParameter(f"{file} has no name")
    revision = call(api_url, token, "PUT", f"/apps/{segment(name)}", json=definition)
    typer.echo(f"{revision['name']} is now at revision {revision['revision']}")


@apps_app.command("list")
def apps_list(api_url: ApiUrl = None, token: Token = None, output: Output = OutputFormat.table) -> None:
    """The latest active revision of each application."""
    items = all_items(api_url, token, "/apps")
    rows = items if output is OutputFormat.json else [_app_row(item) for item in items]
    emit(rows, ["name", "revision", "version", "engine", "ae_titles", "sinks"], output)


@apps_app.command("show")
def apps_show(
    name: str,
    revision: Annotated[int | None, typer.Option("--revision", "-r", min=1, help="this revision")] = None,
    api_url: ApiUrl = None,
    token: Token = None,
    output: Output = OutputFormat.table,
) -> None:
    """One application: its latest active revision, or ``--revision N`` (deleted ones too)."""
    path = f"/apps/{segment(name)}" + (f"/revisions/{revision}" if revision else "")
    item = call(api_url, token, "GET", path)
    if output is OutputFormat.json:
        typer.echo(json.dumps(item, indent=2))
        return
    typer.echo(f"name: {item['name']}\nrevision: {item['revision']}\ncreated_at: {item['created_at']}")
    typer.echo(f"deleted_at: {item['deleted_at'] or '-'}\n---")
    typer.echo(yaml.safe_dump(item["definition"], sort_keys=False).rstrip())


@apps_app.command("delete")
def apps_delete(name: str, api_url: ApiUrl = None, token: Token = None) -> None:
    """Soft-delete an application: it triggers nothing more; its history stays readable."""
    call(api_url, token, "DELETE", f"/apps/{segment(name)}")
    typer.echo(f"deleted application {name}")


@sinks_app.command("create")
def sinks_create(
    name: Annotated[str | None, typer.Argument(help="sink name (overrides the file's)")] = None,
    ae_title: Annotated[str | None, typer.Option("--ae-title", help="the peer's AE title")] = None,
    host: Annotated[str | None, typer.Option("--host", help="the peer's host")] = None,
    port: Annotated[int | None, typer.Option("--port", min=1, max=65535, help="the peer's port")] = None,
    file: Annotated[Path | None, typer.Option("--file", "-f", exists=True, dir_okay=False)] = None,
    echo: Annotated[
        bool, typer.Option("--echo", help="refuse the sink unless the peer answers C-ECHO")
    ] = False,
    api_url: ApiUrl = None,
    token: Token = None,
) -> None:
    """Create a DICOM sink from options, or any sink from a YAML/JSON file."""
    body: dict[str, Any] = load_definition(file) if file else {"type": "dicom"}
    if name:
        body["name"] = name
    if not file:
        if not (name and ae_title and host and port):
            raise typer.BadParameter("give NAME, --ae-title, --host and --port, or --file")
        body["args"] = {"ae_title": ae_title, "host": host, "port": port}
    sink = call(api_url, token, "POST", "/sinks", json=body, params={"echo": "true"} if echo else None)
    typer.echo(f"created sink {sink['name']}")


@sinks_app.command("list")
def sinks_list(api_url: ApiUrl = None, token: Token = None, output: Output = OutputFormat.table) -> None:
    """Every sink."""
    items = all_items(api_url, token, "/sinks")
    rows = items if output is OutputFormat.json else [{**item, **(item.get("args") or {})} for item in items]
    emit(rows, ["name", "type", "ae_title", "host", "port", "extensions"], output)


@sinks_app.command("delete")
def sinks_delete(name: str, api_url: ApiUrl = None, token: Token = None) -> None:
    """Delete a sink no active application exports to."""
    call(api_url, token, "DELETE", f"/sinks/{segment(name)}")
    typer.echo(f"deleted sink {name}")


def _caller(value: str) -> dict[str, str | None]:
    ae_title, at, host = value.rpartition("@")
    return {"ae_title": ae_title, "host": host} if at else {"ae_title": value, "host": None}


@aet_app.command("map")
def aet_map(
    ae_title: Annotated[str, typer.Argument(help="the called AE title")],
    application: Annotated[str, typer.Argument(help="the application it triggers")],
    allow: Annotated[
        list[str] | None, typer.Option("--allow", help="allowed caller: AE[@HOST]; repeatable")
    ] = None,
    api_url: ApiUrl = None,
    token: Token = None,
) -> None:
    """Make an AE title trigger an application (and allow callers)."""
    body = {"allowed_callers": [_caller(value) for value in allow or []]}
    path = f"/aetitles/{segment(ae_title)}/applications/{segment(application)}"
    call(api_url, token, "POST", path, json=body)
    typer.echo(f"{ae_title} now triggers {application}")


@aet_app.command("unmap")
def aet_unmap(ae_title: str, application: str, api_url: ApiUrl = None, token: Token = None) -> None:
    """Stop an AE title triggering an application."""
    call(api_url, token, "DELETE", f"/aetitles/{segment(ae_title)}/applications/{segment(application)}")
    typer.echo(f"{ae_title} no longer triggers {application}")


@aet_app.command("list")
def aet_list(api_url: ApiUrl = None, token: Token = None, output: Output = OutputFormat.table) -> None:
    """Every AE title mapping."""
    items = all_items(api_url, token, "/aetitles")
    rows = items if output is OutputFormat.json else [_mapping_row(item) for item in items]
    emit(rows, ["ae_title", "applications", "allowed_callers"], output)


def _mapping_row(item: dict[str, Any]) -> dict[str, Any]:
    callers = [c["ae_title"] + (f"@{c['host']}" if c.get("host") else "") for c in item["allowed_callers"]]
    return {
        "ae_title": item["ae_title"],
        "applications": item["applications"],
        "allowed_callers": callers or None,
    }
