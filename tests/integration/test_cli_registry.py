"""The real ``mwm`` command (a subprocess) against a running API on the real MongoDB-wire server."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from devkit.peers import LOCALHOST, free_port
from devkit.services import REPO, settings_env, wait_for
from tests.support.api import api_settings
from tests.support.cli import Cli, cli_against_api
from wm.config import Settings

APP_YAML = """\
name: liver
version: "1.0"
ae_titles: [MWM-LIVER]
map:
  image: liver:1
sinks: [pacs]
"""


@pytest.fixture
async def cli(live_settings: Settings) -> AsyncIterator[Cli]:
    async with cli_against_api(live_settings) as command:
        yield command


async def test_apps_from_a_yaml_file(cli: Cli, tmp_path: Path) -> None:
    definition = tmp_path / "liver.yaml"
    definition.write_text(APP_YAML)
    assert (
        await cli("sinks", "create", "pacs", "--ae-title", "PACS", "--host", LOCALHOST, "--port", "104")
    ).code == 0
    assert (await cli("apps", "validate", str(definition))).out.strip() == f"{definition}: valid"
    registered = await cli("apps", "register", str(definition))
    assert (registered.code, registered.out.strip()) == (0, "registered liver revision 1")
    definition.write_text(APP_YAML.replace('"1.0"', '"2.0"'))
    assert (await cli("apps", "update", str(definition))).out.strip() == "liver is now at revision 2"
    listed = json.loads((await cli("apps", "list", "--output", "json")).out)
    assert [(a["name"], a["revision"], a["definition"]["version"]) for a in listed] == [("liver", 2, "2.0")]
    table = (await cli("apps", "list")).out.splitlines()
    assert table[0].split() == ["NAME", "REVISION", "VERSION", "ENGINE", "AE_TITLES", "SINKS"]
    assert table[1].split() == ["liver", "2", "2.0", "local", "MWM-LIVER", "pacs"]
    assert "version: '1.0'" in (await cli("apps", "show", "liver", "--revision", "1")).out
    assert (await cli("apps", "delete", "liver")).code == 0
    missing = await cli("apps", "show", "liver")
    assert missing.code == 1 and "application 'liver' not found" in missing.err


async def test_a_validation_failure_exits_1_and_prints_each_error(cli: Cli, tmp_path: Path) -> None:
    definition = tmp_path / "bad.json"
    definition.write_text(
        json.dumps({"name": "bad", "version": "1", "map": {"cpu": -1}, "sinks": ["a", "b"]})
    )
    for command in ("validate", "register"):
        result = await cli("apps", command, str(definition))
        assert result.code == 1, result
        for field in ("map.cpu", "sinks[0]", "sinks[1]"):
            assert f"  {field}: " in result.err
    assert "unknown sink 'b'" in result.err
    usage = await cli("apps", "register", str(tmp_path / "absent.yaml"))
    assert usage.code == 2


async def test_sinks_and_ae_titles(cli: Cli, tmp_path: Path) -> None:
    (tmp_path / "app.yaml").write_text(APP_YAML.replace("sinks: [pacs]", "sinks: []"))
    await cli("apps", "register", str(tmp_path / "app.yaml"))
    assert (
        await cli("sinks", "create", "pacs", "--ae-title", "PACS", "--host", LOCALHOST, "--port", "104")
    ).code == 0
    taken = await cli("sinks", "create", "pacs", "--ae-title", "PACS", "--host", LOCALHOST, "--port", "104")
    assert taken.code == 1 and "already exists" in taken.err
    sinks = json.loads((await cli("sinks", "list", "-o", "json")).out)
    assert [(s["name"], s["args"]["port"]) for s in sinks] == [("pacs", 104)]
    assert (await cli("sinks", "delete", "pacs")).code == 0
    assert json.loads((await cli("sinks", "list", "-o", "json")).out) == []
    mapped = await cli("aet", "map", "CT-1", "liver", "--allow", "CT", "--allow", "MR@10.0.0.7")
    assert mapped.code == 0, mapped
    table = (await cli("aet", "list")).out
    assert "CT-1" in table and "CT,MR@10.0.0.7" in table
    mappings = json.loads((await cli("aet", "list", "-o", "json")).out)
    assert [(m["ae_title"], m["applications"]) for m in mappings] == [
        ("CT-1", ["liver"]),
        ("MWM-LIVER", ["liver"]),
    ]
    assert (await cli("aet", "unmap", "CT-1", "liver")).code == 0
    again = await cli("aet", "unmap", "CT-1", "liver")
    assert again.code == 1 and "not mapped" in again.err


async def test_unreachable_api_and_wrong_key(cli: Cli) -> None:
    url = f"http://{LOCALHOST}:{free_port()}"
    refused = await cli("apps", "list", "--api-url", url)
    assert refused.code == 1 and f"cannot reach the MWM API at {url}" in refused.err
    wrong = await cli("apps", "list", "--token", "not-a-key-of-this-api")
    assert wrong.code == 1 and "(401)" in wrong.err


async def test_mwm_api_serves_and_mwm_keys_creates_a_working_key(live_settings: Settings) -> None:
    settings = api_settings(live_settings, free_port())
    cli = Cli(settings_env(settings))
    created = await cli("keys", "create", "--name", "ops", "--scope", "read")
    assert created.code == 0, created
    token = created.out.strip()
    assert token.startswith("mwm_") and "not shown again" in created.err
    assert "ops" in (await cli("keys", "list")).out
    server = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "wm",
        "api",
        env=cli.env,
        cwd=REPO,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        async with httpx.AsyncClient(base_url=settings.api.url) as client:
            await wait_for(lambda: _healthy(client), 30, "mwm api to answer /health")
            assert (
                await client.get("/apps", headers={"Authorization": f"Bearer {token}"})
            ).status_code == 200
        assert (await cli("keys", "revoke", "ops")).code == 0
        async with httpx.AsyncClient(base_url=settings.api.url) as client:
            assert (
                await client.get("/apps", headers={"Authorization": f"Bearer {token}"})
            ).status_code == 401
    finally:
        server.terminate()
        await server.wait()


async def _healthy(client: httpx.AsyncClient) -> bool:
    try:
        return (await client.get("/health")).status_code == 200
    except httpx.TransportError:
        return False
