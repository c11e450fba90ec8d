"""Errors a person can act on: each ends the real ``mwm`` command with one clear line, never a traceback."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from devkit.peers import free_port
from devkit.services import REPO, settings_env
from tests.support.cli import Cli, cli_against_api
from wm.config import Settings


@pytest.fixture
async def cli(live_settings: Settings) -> AsyncIterator[Cli]:
    async with cli_against_api(live_settings) as command:
        yield command


@pytest.fixture
def offline(settings: Settings) -> Cli:
    """The command with this test's settings and no API key; nothing needs to be running."""
    return Cli({**settings_env(settings), "MWM_API__TOKEN": ""})


@pytest.fixture
def taken_port() -> Iterator[int]:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield holder.getsockname()[1]


async def test_no_api_key_says_how_to_give_one(offline: Cli) -> None:
    result = await offline("apps", "list")

    assert (result.code, result.err) == (1, "error: no API key: set MWM_API__TOKEN or pass --token\n")


async def test_validate_lists_every_error_the_unknown_engine_included(cli: Cli, tmp_path: Path) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text(
        "name: liver\nae_titles: [MWM-LIVER]\nmap: {image: liver:1}\n"
        "sinks: [nowhere]\nengine: {name: nosuch}\n"
    )

    result = await cli("apps", "validate", str(broken))

    assert result.code == 1
    lines = result.err.splitlines()
    assert lines[0] == f"{broken}: 3 error(s)", result.err
    assert sorted(lines[1:]) == [
        "  engine.name: unknown engine 'nosuch'; installed: argo, local",
        "  sinks[0]: unknown sink 'nowhere'; create it first",
        "  version: Field required",
    ]


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        (
            "MWM_BUS__PREFETCH",
            "many",
            "Input should be a valid integer, unable to parse string as an integer",
        ),
        ("MWM_OBSERVABILITY__LOG_FORMAT", "xml", "Input should be 'auto', 'console' or 'json'"),
    ],
)
async def test_an_invalid_setting_is_one_line_naming_the_variable(
    offline: Cli, variable: str, value: str, message: str
) -> None:
    result = await Cli({**offline.env, variable: value})("dlq", "list")

    assert (result.code, result.err) == (1, f"error: invalid setting {variable}={value!r}: {message}\n")


@pytest.mark.parametrize(
    ("command", "variable"),
    [
        (("consume", "discovery"), "MWM_OBSERVABILITY__HTTP_PORT"),
        (("gateway",), "MWM_OBSERVABILITY__HTTP_PORT"),
        (("gateway",), "MWM_GATEWAY__PORT"),
        (("api",), "MWM_API__PORT"),
    ],
)
async def test_a_port_in_use_is_one_line_naming_the_variable(
    offline: Cli, taken_port: int, command: tuple[str, ...], variable: str
) -> None:
    env = {
        **offline.env,
        variable: str(taken_port),
        "MWM_GATEWAY__HOST": "127.0.0.1",
        "MWM_OBSERVABILITY__LOG_FORMAT": "console",
    }

    result = await Cli(env)(*command)

    assert result.code == 1
    assert result.err == (
        f"error: {variable}={taken_port}: port {taken_port} on 127.0.0.1 is already in use (another MWM "
        f"process?); set {variable} to a free port\n"
    )


@pytest.mark.parametrize("argv", [("-m", "wm.config"), ("-m", "wm", "topology", "--help")])
def test_a_closed_pipe_ends_quietly(settings: Settings, argv: tuple[str, ...]) -> None:
    # The reader is gone before the command writes (as `| head` after its lines): no traceback.
    process = subprocess.Popen(
        [sys.executable, *argv],
        cwd=REPO,
        env=settings_env(settings),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert process.stdout is not None and process.stderr is not None
    process.stdout.close()
    err = process.stderr.read().decode()
    process.wait(timeout=60)

    assert err == ""
    assert process.returncode == 1


async def test_export_client_takes_the_api_url_as_an_option(cli: Cli) -> None:
    elsewhere = {**cli.env, "MWM_API__URL": f"http://127.0.0.1:{free_port()}"}
    api_url = cli.env["MWM_API__URL"]

    result = await Cli(elsewhere)(
        "export-client", "--sink", "ig", "--ae-title", "PACS", "--host", "127.0.0.1", "--port", "104",
        "--once", "--api-url", api_url,
    )  # fmt: skip

    assert (result.code, result.out) == (0, "exported 0 task(s)\n"), result.err
