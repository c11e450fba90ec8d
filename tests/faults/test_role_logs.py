"""With JSON logs chosen, every line each role writes is one JSON object, through a broker restart.

The API, the gateway, one consumer and ``mwm run`` run as child processes on this test's own queues,
database and bucket; RabbitMQ (this environment's stack only) is restarted under them. Each must reconnect
by itself (``mwm_bus_reconnects_total`` rises, ``mwm_bus_connected`` is 1 again, ``/readyz`` answers 200),
then stop cleanly on SIGTERM; every line of every log, aiormq's, aio-pika's and uvicorn's included, must
parse as a JSON object.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from devkit.services import services_command, settings_env
from tests.support.roles import Probe, RoleSpec, RunningRole, started_role
from wm.config import Settings

READY = Probe(path="/readyz", port="observability", timeout_s=3)
ROLES = {
    "gateway": ["mwm", "gateway"],
    "discovery": ["mwm", "consume", "discovery"],
    "run": ["mwm", "run"],
}


def role(name: str, settings: Settings) -> RoleSpec:
    argv = ["mwm", "api"] if name == "api" else ROLES[name]
    env = settings_env(settings) | {
        "MWM_OBSERVABILITY__LOG_FORMAT": "json",
        "MWM_OBSERVABILITY__HTTP_PORT": "9100",
        "MWM_API__PORT": "8000",
        "MWM_GATEWAY__PORT": "11112",
        # The default retry budget, as deployed: four processes creating one new database's indexes at once
        # make the MongoDB-wire server drop connections for a moment.
        "MWM_RETRY__ATTEMPTS": "10",
        "MWM_RETRY__INITIAL_DELAY_S": "0.2",
        "MWM_RETRY__MAX_DELAY_S": "10",
    }
    ports = {"observability": 9100, "http": 8000, "dicom": 11112}
    return RoleSpec(name=name, argv=argv, env=env, ports=ports)


@pytest.fixture
def roles(live_settings: Settings, tmp_path: Path) -> Iterator[dict[str, RunningRole]]:
    with ExitStack() as stack:
        # The API first: the MongoDB-wire server used here panics (mongowire "slice bounds out of range")
        # when several processes create the indexes of one new database's collections at the same moment.
        api = stack.enter_context(started_role(role("api", live_settings), tmp_path))
        api.wait_until(READY, within_s=120)
        others = {
            name: stack.enter_context(started_role(role(name, live_settings), tmp_path)) for name in ROLES
        }
        yield {"api": api, **others}


def reconnects(role: RunningRole) -> float:
    match = re.search(r"^mwm_bus_reconnects_total (\S+)$", role.metrics(), re.M)
    assert match, role.metrics()
    return float(match.group(1))


@pytest.mark.timeout(600)
def test_every_log_line_is_json_through_a_broker_restart(roles: dict[str, RunningRole]) -> None:
    for running in roles.values():
        running.wait_until(READY, within_s=120)
        assert reconnects(running) == 0

    services_command("restart", "rabbitmq")

    for name, running in roles.items():
        deadline = time.monotonic() + 120
        while reconnects(running) < 1:
            assert time.monotonic() < deadline, f"{name} did not reconnect:\n{running.tail()}"
            time.sleep(0.5)
        running.wait_until(READY, within_s=60)
        assert re.search(r"^mwm_bus_connected 1\.0$", running.metrics(), re.M), name
    codes = {name: running.terminate() for name, running in roles.items()}
    assert set(codes.values()) == {0}, codes

    sources: set[str] = set()
    tracebacks = 0
    for name, running in roles.items():
        lines = running.log.read_text().splitlines()
        assert lines, f"{name} logged nothing"
        for number, line in enumerate(lines, 1):
            try:
                record = json.loads(line)
            except ValueError:
                pytest.fail(f"{name} log line {number} is not JSON: {line!r}")
            assert isinstance(record, dict) and "event" in record and "level" in record, line
            sources.add(record.get("logger", "structlog"))
            tracebacks += str(record.get("exception", "")).startswith("Traceback")
    # The broker's restart makes aiormq and aio-pika log, some with a traceback: each a field of one line.
    assert {"uvicorn.error", "aiormq.connection", "aio_pika.robust_connection"} <= sources, sources
    assert tracebacks > 0
