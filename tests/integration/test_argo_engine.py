"""The ``argo`` engine through the real SDK against the Argo Server stand-in in ``tests.support``."""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from argo_workflows.api.workflow_service_api import WorkflowServiceApi

from schemas.applications import ApplicationDefinition
from tests.support.argo_server import ArgoServer
from wm.config import Settings
from wm.engines import Engine, EngineStatus, JobSpec
from wm.engines.argo import ArgoEngine, as_json
from wm.engines.argo_workflow import build_workflow
from wm.errors import PermanentError, TransientError

TOKEN = "s3cret-token"


@pytest.fixture
def server() -> Iterator[ArgoServer]:
    """A fresh Argo Server stand-in that requires ``TOKEN``."""
    with ArgoServer(token=TOKEN) as fake:
        yield fake


def argo_settings(settings: Settings, server: ArgoServer, **argo: Any) -> Settings:
    """``settings`` pointing the engine at ``server``, with quick retries."""
    values = {"server_url": server.url, "token": TOKEN, "retries": 2, "request_timeout_s": 2.0, **argo}
    return settings.model_copy(update={"argo": settings.argo.model_copy(update=values)})


@pytest.fixture
async def engine(settings: Settings, server: ArgoServer) -> AsyncIterator[ArgoEngine]:
    """The engine under test, closed afterwards."""
    built = ArgoEngine(argo_settings(settings, server))
    yield built
    built.close()


def application(**engine_argo: Any) -> ApplicationDefinition:
    """An Argo application; ``engine_argo`` sets its ``engine.argo`` options."""
    return ApplicationDefinition.model_validate(
        {
            "name": "liver-seg",
            "version": "1",
            "map": {"image": "registry/liver:1", "timeout_s": 60},
            "engine": {"name": "argo", "argo": engine_argo},
        }
    )


def job(
    job_id: str = "job-0001", deadline_in_s: float = 60, app: ApplicationDefinition | None = None
) -> JobSpec:
    """A job of ``application()`` with its deadline ``deadline_in_s`` from now."""
    return JobSpec(
        job_id=job_id,
        correlation_id="corr-1",
        application=app or application(),
        input_prefix=f"jobs/{job_id}/input",
        output_prefix=f"jobs/{job_id}/output",
        deadline=datetime.now(UTC) + timedelta(seconds=deadline_in_s),
    )


async def wait_terminal(engine: Engine, engine_job_id: str, timeout_s: float = 5.0) -> list[EngineStatus]:
    """Poll ``status`` until a terminal phase; every distinct status seen, in order."""
    seen: list[EngineStatus] = []
    give_up = time.monotonic() + timeout_s
    while not (seen and seen[-1].terminal):
        assert time.monotonic() < give_up, f"not terminal after {timeout_s}s: {seen}"
        current = await engine.status(engine_job_id)
        if not seen or seen[-1] != current:
            seen.append(current)
        await asyncio.sleep(0.02)
    return seen


async def test_launch_runs_to_success_with_outputs(engine: ArgoEngine, server: ArgoServer) -> None:
    spec = job()
    engine_job_id = await engine.launch(spec)
    assert engine_job_id == "argo/job-0001"
    assert (await engine.status(engine_job_id)).phase == "pending"
    server.script("job-0001", [(0.05, "Pending", None), (0.15, "Running", None), (0.3, "Succeeded", None)])
    seen = await wait_terminal(engine, engine_job_id)
    assert [status.phase for status in seen] == ["pending", "running", "succeeded"]
    assert [(ref.key, ref.size) for ref in seen[-1].outputs] == [("jobs/job-0001/output", 0)]


async def test_the_sdk_sends_the_built_workflow_unchanged(
    engine: ArgoEngine, server: ArgoServer, settings: Settings
) -> None:
    spec = job(app=application(service_account="runner"))
    await engine.launch(spec)
    stored = server.workflow("job-0001")
    assert stored is not None
    expected = build_workflow(spec, argo_settings(settings, server), datetime.now(UTC))
    assert stored["metadata"]["labels"] == expected["metadata"]["labels"]
    assert stored["spec"] | {"activeDeadlineSeconds": 0} == expected["spec"] | {"activeDeadlineSeconds": 0}


@pytest.mark.parametrize(("argo_phase", "phase"), [("Failed", "failed"), ("Error", "error")])
async def test_failure_and_error_carry_the_message(
    engine: ArgoEngine, server: ArgoServer, argo_phase: str, phase: str
) -> None:
    engine_job_id = await engine.launch(job())
    server.set_phase("job-0001", "Running")
    server.set_phase("job-0001", argo_phase, message="OOMKilled (exit code 137)")
    assert await engine.status(engine_job_id) == EngineStatus(phase, "OOMKilled (exit code 137)")  # type: ignore[arg-type]


async def test_a_job_past_its_deadline_is_stopped_then_terminated(
    engine: ArgoEngine, server: ArgoServer
) -> None:
    spec = job(deadline_in_s=-1)
    engine_job_id = await engine.launch(spec)
    server.set_phase("job-0001", "Running")
    assert (await engine.status(engine_job_id)).phase == "running" and datetime.now(UTC) > spec.deadline
    await engine.cancel(engine_job_id)  # what the monitor does with a job past its deadline
    assert server.called("PUT", "/job-0001/stop") == 1
    assert server.called("PUT", "/job-0001/terminate") == 1
    assert await engine.status(engine_job_id) == EngineStatus("failed", "Stopped with strategy 'Terminate'")


async def test_cancel_leaves_finished_and_missing_workflows_alone(
    engine: ArgoEngine, server: ArgoServer
) -> None:
    engine_job_id = await engine.launch(job())
    server.set_phase("job-0001", "Succeeded")
    await engine.cancel(engine_job_id)  # Argo: 500 "cannot shutdown a completed workflow", not retried
    await engine.cancel("argo/no-such-job")
    assert server.called("PUT", "/job-0001/stop") == 1
    assert server.called("PUT", "/job-0001/terminate") == 0
    assert (await engine.status(engine_job_id)).phase == "succeeded"


async def test_unavailable_server_is_retried_then_succeeds(engine: ArgoEngine, server: ArgoServer) -> None:
    server.fail_next(2, status=503)
    assert await engine.launch(job()) == "argo/job-0001"
    assert server.called("POST", "/workflows/argo") == 3


async def test_always_unavailable_is_transient_after_bounded_retries(
    engine: ArgoEngine, server: ArgoServer
) -> None:
    server.fail_next(10, status=503)
    with pytest.raises(TransientError, match="503"):
        await engine.launch(job())
    assert server.called("POST", "/workflows/argo") == 3  # one try and settings.argo.retries == 2


async def test_unreachable_server_is_transient(engine: ArgoEngine, server: ArgoServer) -> None:
    engine_job_id = await engine.launch(job())
    server.stop()
    try:
        with pytest.raises(TransientError, match="unreachable"):
            await engine.status(engine_job_id)
        problems = await engine.validate(application())
        assert len(problems) == 1 and "unreachable" in problems[0]
    finally:
        server.start()
    assert (await engine.status(engine_job_id)).phase == "pending"


async def test_duplicate_launch_is_idempotent(engine: ArgoEngine, server: ArgoServer) -> None:
    first = await engine.launch(job())
    second = await engine.launch(job())
    assert first == second
    assert server.called("POST", "/workflows/argo") == 2
    listing = await asyncio.to_thread(
        WorkflowServiceApi(engine._client).list_workflows,
        "argo",
        list_options_label_selector="mwm.job-id=job-0001",
        _check_return_type=False,
    )
    assert [item["metadata"]["name"] for item in as_json(listing)["items"]] == ["job-0001"]


async def test_validate_checks_the_named_template(engine: ArgoEngine, server: ArgoServer) -> None:
    app = application(namespace="imaging", workflow_template="liver-seg-v1")
    assert await engine.validate(app) == ["workflow template liver-seg-v1 not found in namespace imaging"]
    server.add_template("liver-seg-v1", namespace="imaging")
    assert await engine.validate(app) == []


async def test_validate_lints_the_generated_workflow(engine: ArgoEngine, server: ArgoServer) -> None:
    assert await engine.validate(application()) == []
    assert server.called("POST", "/workflows/argo/lint") == 1
    server.fail_next(1, status=400)
    [problem] = await engine.validate(application())
    assert problem.startswith("argo lint rejected the workflow") and "injected failure 400" in problem
    no_image = ApplicationDefinition.model_validate(
        {"name": "a", "version": "1", "map": {"command": ["x"]}, "engine": {"name": "argo"}}
    )
    [problem] = await engine.validate(no_image)
    assert problem.startswith("map.image is required")


async def test_bearer_token_is_required_and_sent(settings: Settings, server: ArgoServer) -> None:
    anonymous = ArgoEngine(argo_settings(settings, server, token=""))
    try:
        with pytest.raises(PermanentError, match="401"):
            await anonymous.launch(job())
        [problem] = await anonymous.validate(application())
        assert "401" in problem
    finally:
        anonymous.close()
    assert server.workflows == {}


async def test_cleanup_deletes_the_workflow_once(engine: ArgoEngine, server: ArgoServer) -> None:
    engine_job_id = await engine.launch(job())
    await engine.cleanup(engine_job_id)
    await engine.cleanup(engine_job_id)
    assert server.workflow("job-0001") is None
    status = await engine.status(engine_job_id)
    assert (status.phase, status.message) == ("error", "workflow job-0001 not found in namespace argo")


@pytest.fixture
def certificate(tmp_path: Path) -> tuple[str, str]:
    """A self-signed certificate and key for 127.0.0.1 (PEM files)."""
    cert, key = tmp_path / "argo.crt", tmp_path / "argo.key"
    command = [
        "openssl",
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-days",
        "1",
        "-subj",
        "/CN=127.0.0.1",
        "-addext",
        "subjectAltName=IP:127.0.0.1",
        "-keyout",
        str(key),
        "-out",
        str(cert),
    ]
    subprocess.run(command, check=True, capture_output=True)
    return str(cert), str(key)


async def test_tls_is_verified_with_the_configured_ca(
    settings: Settings, certificate: tuple[str, str]
) -> None:
    with ArgoServer(token=TOKEN, tls=certificate) as tls_server:
        trusting = ArgoEngine(argo_settings(settings, tls_server, ca_cert=certificate[0]))
        untrusting = ArgoEngine(argo_settings(settings, tls_server, retries=0))
        try:
            assert await trusting.launch(job()) == "argo/job-0001"
            with pytest.raises(TransientError, match="CERTIFICATE_VERIFY_FAILED"):
                await untrusting.status("argo/job-0001")
        finally:
            trusting.close()
            untrusting.close()
