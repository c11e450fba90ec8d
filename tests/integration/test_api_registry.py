"""The registry API over HTTP (uvicorn on a free port) against the real MongoDB-wire server."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from devkit.peers import LOCALHOST, StoreSCP, free_port
from schemas.applications import ApplicationDefinition
from tests.support.api import assert_problem
from wm.adapters.mongo import Database
from wm.api.app import create_app
from wm.api.server import running
from wm.config import Settings
from wm.registry import Registry, migrate
from wm.stores.auth import API_KEYS, ApiKeys


async def fake_engine(application: ApplicationDefinition) -> list[str]:
    """An engine that cannot resolve images tagged ``missing`` (engines are ports; none is installed yet)."""
    return ["image cannot be resolved"] if (application.map.image or "").endswith(":missing") else []


@dataclass
class Api:
    client: httpx.AsyncClient
    database: Database
    admin: str

    def as_key(self, token: str | None) -> httpx.AsyncClient:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.AsyncClient(base_url=self.client.base_url, headers=headers)


def with_admin_key(settings: Settings) -> Settings:
    admin = f"bootstrap-{uuid.uuid4().hex}"
    return settings.model_copy(update={"api": settings.api.model_copy(update={"bootstrap_admin_key": admin})})


@pytest.fixture
async def api(live_settings: Settings) -> AsyncIterator[Api]:
    settings = with_admin_key(live_settings)
    admin = settings.api.bootstrap_admin_key
    async with (
        running(create_app(settings, fake_engine), LOCALHOST, free_port()) as url,
        httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {admin}"}) as client,
        Database(settings.mongo) as database,
    ):
        yield Api(client, database, admin)


def app_definition(name: str, **changes: Any) -> dict[str, Any]:
    return {
        "name": name,
        "version": "1.0",
        "ae_titles": ["MWM-LIVER"],
        "map": {"image": "liver:1"},
        **changes,
    }


def sink_definition(name: str, port: int = 11112) -> dict[str, Any]:
    return {"name": name, "args": {"ae_title": "PACS", "host": LOCALHOST, "port": port}}


async def test_register_list_show_revise_and_delete(api: Api) -> None:
    created = await api.client.post("/apps", json=app_definition("liver"))
    assert created.status_code == 201, created.text
    assert created.json()["revision"] == 1
    revised = await api.client.put("/apps/liver", json=app_definition("liver", version="2.0"))
    assert revised.status_code == 201 and revised.json()["revision"] == 2
    latest = (await api.client.get("/apps/liver")).json()
    assert (latest["revision"], latest["definition"]["version"]) == (2, "2.0")
    listing = (await api.client.get("/apps", params={"page_size": 1})).json()
    assert (listing["total"], listing["page"], [i["revision"] for i in listing["items"]]) == (1, 1, [2])
    assert (await api.client.delete("/apps/liver")).status_code == 204
    assert_problem(await api.client.get("/apps/liver"), 404)
    old = (await api.client.get("/apps/liver/revisions/1")).json()
    assert old["definition"]["version"] == "1.0" and old["deleted_at"] is not None
    again = await api.client.post("/apps", json=app_definition("liver", version="3.0"))
    assert again.status_code == 201 and again.json()["revision"] == 3


async def test_listing_pages(api: Api) -> None:
    for name in ("app-c", "app-a", "app-b"):
        assert (await api.client.post("/apps", json=app_definition(name))).status_code == 201
    second = (await api.client.get("/apps", params={"page": 2, "page_size": 2})).json()
    assert [item["name"] for item in second["items"]] == ["app-c"] and second["total"] == 3
    body = assert_problem(await api.client.get("/apps", params={"page_size": 500}), 422)
    assert body["errors"][0]["field"] == "query.page_size"


async def test_an_invalid_definition_returns_every_error(api: Api) -> None:
    await api.client.post("/sinks", json=sink_definition("pacs"))
    bad = app_definition("liver", sinks=["pacs", "archive", "nowhere"], map={"image": "liver:missing"})
    body = assert_problem(await api.client.post("/apps", json=bad), 422)
    assert {(e["field"], e["message"]) for e in body["errors"]} == {
        ("sinks[1]", "unknown sink 'archive'; create it first"),
        ("sinks[2]", "unknown sink 'nowhere'; create it first"),
        ("engine", "image cannot be resolved"),
    }
    schema_and_sink = app_definition("liver", map={"cpu": -1}, sinks=["nowhere"], colour="red")
    body = assert_problem(await api.client.post("/apps", json=schema_and_sink), 422)
    assert {e["field"] for e in body["errors"]} == {"map.cpu", "colour", "sinks[0]"}
    report = (await api.client.post("/apps/validate", json=bad)).json()
    assert report["valid"] is False and len(report["errors"]) == 3
    assert (await api.client.post("/apps/validate", json=app_definition("ok"))).json() == {
        "valid": True,
        "errors": [],
    }
    assert_problem(await api.client.get("/apps/liver"), 404)


async def test_the_default_validator_names_an_unknown_engine(live_settings: Settings) -> None:
    settings = with_admin_key(live_settings)
    headers = {"Authorization": f"Bearer {settings.api.bootstrap_admin_key}"}
    async with (
        running(create_app(settings), LOCALHOST, free_port()) as url,
        httpx.AsyncClient(base_url=url, headers=headers) as client,
    ):
        body = assert_problem(
            await client.post("/apps", json=app_definition("x", engine={"name": "nosuch"})), 422
        )
    assert [e["field"] for e in body["errors"]] == ["engine.name"]
    assert "unknown engine 'nosuch'" in body["errors"][0]["message"]


async def test_keys_and_scopes(api: Api) -> None:
    keys = ApiKeys(api.database)
    _, reader = await keys.create("reader", "read")
    _, gateway = await keys.create("gateway", "gateway")
    async with api.as_key(None) as anonymous, api.as_key(reader) as read, api.as_key(gateway) as gw:
        refused = assert_problem(await anonymous.get("/apps"), 401)
        assert "API key" in refused["detail"]
        assert (await anonymous.get("/apps")).headers["www-authenticate"] == "Bearer"
        assert_problem(await api.as_key("mwm_0123456789abcdef_" + "x" * 43).get("/apps"), 401)
        assert (await read.get("/apps")).status_code == 200
        assert_problem(await read.post("/apps", json=app_definition("liver")), 403)
        assert_problem(await gw.get("/apps"), 403)
        assert (await gw.get("/aetitles")).status_code == 200
        assert (await anonymous.get("/health")).json() == {"status": "ok", "checks": {"database": True}}
    await keys.revoke("reader")
    assert_problem(await api.as_key(reader).get("/apps"), 401)
    stored = await api.database.collection(API_KEYS).find({}).to_list()
    assert {d["name"] for d in stored} == {"bootstrap", "reader", "gateway"}
    for secret in (reader, gateway, api.admin, reader.rsplit("_", 1)[-1]):
        assert all(secret not in str(document) for document in stored)


@pytest.mark.parametrize("round_", range(4))
async def test_two_concurrent_registrations_one_wins(api: Api, round_: int) -> None:
    name = f"race-{uuid.uuid4().hex[:8]}"
    first, second = await asyncio.gather(
        api.client.post("/apps", json=app_definition(name, version="a")),
        api.client.post("/apps", json=app_definition(name, version="b")),
    )
    assert sorted([first.status_code, second.status_code]) == [201, 409]
    loser = first if first.status_code == 409 else second
    assert_problem(loser, 409)
    revisions = await api.database.collection("applications").count_documents({"name": name})
    assert revisions == 1
    updates = await asyncio.gather(
        *(api.client.put(f"/apps/{name}", json=app_definition(name)) for _ in range(2))
    )
    won = [response.json()["revision"] for response in updates if response.status_code == 201]
    assert {response.status_code for response in updates} <= {201, 409} and len(set(won)) == len(won) >= 1


async def test_later_triggers_use_the_new_revision_and_never_a_deleted_app(api: Api) -> None:
    registry = Registry(api.database)
    await api.client.post("/apps", json=app_definition("liver"))
    await api.client.post("/apps", json=app_definition("lung", ae_titles=[]))
    await api.client.post("/aetitles/MWM-LIVER/applications/lung")
    await api.client.put("/apps/liver", json=app_definition("liver", version="2.0"))
    triggered = await registry.applications_for("MWM-LIVER")
    assert [(a.name, a.revision, a.definition.version) for a in triggered] == [
        ("liver", 2, "2.0"),
        ("lung", 1, "1.0"),
    ]
    await api.client.delete("/apps/liver")
    assert [a.name for a in await registry.applications_for("MWM-LIVER")] == ["lung"]
    assert await registry.applications_for("NOBODY") == []


async def test_sinks(api: Api) -> None:
    assert (await api.client.post("/sinks", json=sink_definition("pacs"))).status_code == 201
    assert_problem(await api.client.post("/sinks", json=sink_definition("pacs")), 409)
    assert (await api.client.get("/sinks/pacs")).json()["args"]["ae_title"] == "PACS"
    assert [s["name"] for s in (await api.client.get("/sinks")).json()["items"]] == ["pacs"]
    await api.client.post("/apps", json=app_definition("liver", sinks=["pacs"]))
    in_use = assert_problem(await api.client.delete("/sinks/pacs"), 409)
    assert "liver" in in_use["detail"]
    await api.client.delete("/apps/liver")
    assert (await api.client.delete("/sinks/pacs")).status_code == 204
    assert_problem(await api.client.get("/sinks/pacs"), 404)
    body = assert_problem(await api.client.post("/sinks", json={"name": "Bad Name", "args": {}}), 422)
    assert {"name", "args.ae_title", "args.host", "args.port"} <= {e["field"] for e in body["errors"]}


async def test_a_sink_can_be_checked_with_c_echo(api: Api, tmp_path: Path) -> None:
    async with StoreSCP(tmp_path, aet="PACS") as peer:
        answered = await api.client.post(
            "/sinks", params={"echo": "true"}, json=sink_definition("up", peer.port)
        )
        assert answered.status_code == 201, answered.text
    silent = await api.client.post(
        "/sinks", params={"echo": "true"}, json=sink_definition("down", free_port())
    )
    body = assert_problem(silent, 422)
    assert body["errors"][0]["field"] == "args" and "C-ECHO" in body["errors"][0]["message"]
    assert_problem(await api.client.get("/sinks/down"), 404)


async def test_ae_title_mappings(api: Api) -> None:
    await api.client.post("/apps", json=app_definition("liver"))
    await api.client.post("/apps", json=app_definition("lung", ae_titles=[]))
    mapped = await api.client.post(
        "/aetitles/CT-1/applications/lung", json={"allowed_callers": [{"ae_title": "CT"}]}
    )
    assert mapped.json() == {
        "ae_title": "CT-1",
        "applications": ["lung"],
        "allowed_callers": [{"ae_title": "CT", "host": None}],
    }
    assert_problem(await api.client.post("/aetitles/CT-1/applications/nosuch"), 404)
    listing = (await api.client.get("/aetitles")).json()
    assert [(m["ae_title"], m["applications"]) for m in listing["items"]] == [
        ("CT-1", ["lung"]),
        ("MWM-LIVER", ["liver"]),
    ]
    replaced = await api.client.put("/aetitles/CT-1", json={"ae_title": "CT-1", "applications": ["liver"]})
    assert replaced.json() == {"ae_title": "CT-1", "applications": ["liver"], "allowed_callers": []}
    unknown = assert_problem(
        await api.client.put("/aetitles/CT-1", json={"ae_title": "CT-1", "applications": ["x"]}), 422
    )
    assert unknown["errors"] == [{"field": "applications[0]", "message": "unknown application 'x'"}]
    assert (await api.client.delete("/aetitles/CT-1/applications/liver")).json()["applications"] == []
    assert_problem(await api.client.delete("/aetitles/CT-1/applications/liver"), 404)
    assert_problem(await api.client.get("/aetitles/NOT-MAPPED"), 404)


async def test_concurrent_mappings_of_one_ae_title_all_stick(api: Api) -> None:
    names = [f"app-{i}" for i in range(6)]
    for name in names:
        await api.client.post("/apps", json=app_definition(name, ae_titles=[]))
    await asyncio.gather(*(api.client.post(f"/aetitles/SHARED/applications/{n}") for n in names))
    assert (await api.client.get("/aetitles/SHARED")).json()["applications"] == names


async def test_migrations_run_once_and_the_docs_are_served(api: Api) -> None:
    assert await migrate(api.database) == []
    recorded = await api.database.collection("schema_migrations").find({}).to_list()
    assert [document["_id"] for document in recorded] == ["0001-registry-indexes"]
    openapi = (await api.client.get("/openapi.json")).json()
    assert {"/apps", "/apps/{name}", "/sinks", "/aetitles/{aet}", "/health"} <= set(openapi["paths"])
    body_schema = openapi["paths"]["/apps"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body_schema == {"$ref": "#/components/schemas/ApplicationDefinition"}
    assert (await api.client.get("/docs")).status_code == 200
    assert_problem(await api.client.get("/nowhere"), 404)
