"""docker-compose.rabbitmq.yml's MWM services, run with the commands and settings it gives them.

No Docker here: each service's process is what the image would run, ``ENTRYPOINT`` (from the Dockerfile)
followed by the service's ``command``, with the Dockerfile's ``ENV`` and the service's ``environment``
(its broker, database and object store pointed at this environment's). The service's own healthcheck
command must pass, each published container port must be listened on by every interface (inside a
container, 127.0.0.1 is unreachable from the host's published port and from the other containers), and
the scheduler and monitor must share the volume holding the work directory.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
import yaml

from devkit.services import REPO
from tests.support.roles import RoleSpec, RunningRole, resolve_command, started_role
from tests.support.services import require_services
from wm.config import Settings

COMPOSE = REPO / "docker-compose.rabbitmq.yml"
DOCKERFILE = REPO / "Dockerfile"


def image_defaults() -> tuple[list[str], dict[str, str], list[int]]:
    """The runtime image's ENTRYPOINT, ENV and EXPOSEd ports, read from the Dockerfile's last stage."""
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    runtime = text[text.rindex("\nFROM ") :]
    entrypoint = json.loads(re.search(r"^ENTRYPOINT (\[.*\])$", runtime, re.M).group(1))  # type: ignore[union-attr]
    env: dict[str, str] = {}
    for line in re.findall(r"^ENV (.*)$", runtime, re.M):
        env.update(dict(pair.split("=", 1) for pair in line.split()))
    exposed = [int(port) for line in re.findall(r"^EXPOSE (.*)$", runtime, re.M) for port in line.split()]
    return entrypoint, env, exposed


def compose_services() -> dict[str, dict[str, Any]]:
    services: dict[str, dict[str, Any]] = yaml.safe_load(COMPOSE.read_text())["services"]
    return {name: spec for name, spec in services.items() if "build" in spec}  # built from this repository


def role_spec(name: str, service: dict[str, Any], settings: Settings) -> RoleSpec:
    entrypoint, image_env, exposed = image_defaults()
    env = {**image_env, **{key: str(value) for key, value in service["environment"].items()}}
    env.update(
        MWM_BUS__URL=settings.bus.url,
        MWM_MONGO__URL=settings.mongo.url,
        MWM_OBJECT_STORE__ENDPOINT=settings.object_store.endpoint,
    )
    return RoleSpec(
        name=f"compose-{name}",
        argv=[*entrypoint, *service["command"]],
        env=env,
        ports={str(port): port for port in exposed},
        mounts={env["MWM_WORK_DIR"]: f"compose-{name}-work"}
        | {volume.split(":")[1]: volume.split(":")[0] for volume in service.get("volumes", [])},
    )


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, RunningRole]]:
    settings = Settings()
    require_services(settings)
    scratch = tmp_path_factory.mktemp("compose-as-run")
    with ExitStack() as stack:
        yield {
            name: stack.enter_context(started_role(role_spec(name, service, settings), scratch))
            for name, service in compose_services().items()
        }


@pytest.mark.timeout(600)
def test_every_service_passes_its_healthcheck(running: dict[str, RunningRole]) -> None:
    services = compose_services()
    assert set(running) == {"api", "gateway", "discovery", "scheduler", "monitor", "exporter"}
    for name, role in running.items():
        check = services[name]["healthcheck"]["test"]
        assert check[0] == "CMD", check
        deadline = time.monotonic() + 120
        while True:
            assert role.process.poll() is None, f"{name} exited:\n{role.tail()}"
            result = subprocess.run(resolve_command(check[1:]), env=role.env, capture_output=True, timeout=30)
            if result.returncode == 0:
                break
            assert time.monotonic() < deadline, (
                f"{name}: healthcheck fails: {result.stderr[-500:]!r}\n{role.tail()}"
            )
            time.sleep(1)


@pytest.mark.timeout(600)
def test_published_ports_listen_on_every_interface(running: dict[str, RunningRole]) -> None:
    for name, service in compose_services().items():
        role = running[name]
        for published in service.get("ports", []):
            container_port = int(published.rsplit(":", 1)[1])
            local = role.local_ports[container_port]
            deadline = time.monotonic() + 120
            while not (addresses := listening_addresses(local)) and time.monotonic() < deadline:
                time.sleep(0.5)
            assert addresses, f"{name}: nothing listens on container port {container_port}\n{role.tail()}"
            assert addresses <= {"0.0.0.0", "::"}, f"{name} listens on {addresses} only"


def test_scheduler_and_monitor_share_the_work_directory() -> None:
    services = compose_services()
    settings = Settings()
    specs = {name: role_spec(name, services[name], settings) for name in ("scheduler", "monitor")}
    volumes = {name: spec.mounts[spec.env["MWM_WORK_DIR"]] for name, spec in specs.items()}
    assert volumes["scheduler"] == volumes["monitor"], volumes


def test_commands_follow_the_image_entrypoint() -> None:
    entrypoint, _, _ = image_defaults()
    for name, service in compose_services().items():
        argv = [*entrypoint, *service["command"]]
        assert argv[1] != argv[0], f"{name}: {argv} repeats the entrypoint"
        help_run = subprocess.run(
            [*resolve_command(argv), "--help"], capture_output=True, text=True, timeout=60
        )
        assert help_run.returncode == 0, f"{name}: {argv} is not a command: {help_run.stderr}"


def listening_addresses(port: int) -> set[str]:
    """Addresses a socket listens on at ``port`` (from /proc/net/tcp and tcp6; state 0A = LISTEN)."""
    found = set()
    for table, wildcard in (("/proc/net/tcp", "0.0.0.0"), ("/proc/net/tcp6", "::")):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:
                found.add(wildcard if set(address) == {"0"} else address)
    return found
