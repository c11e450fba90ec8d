"""The ``argo`` engine through the official SDK against a real Argo Server and workflow-controller.

The stack is ``scripts/argo-stack`` (kube-apiserver, etcd, kwok for the nodes): see
``devkit.argo_stack`` for what stands in for the containers that never run.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from devkit.argo_stack import (
    ARGO_GROUP,
    ArgoStack,
    Executor,
    argo_stack,
    stack_command,
    workflow_path,
)
from schemas.applications import ApplicationDefinition
from wm.adapters.objectstore import ObjectStore
from wm.config import Settings
from wm.engines import EngineStatus, JobSpec
from wm.engines.argo import ArgoEngine
from wm.engines.argo_workflow import ArgoEngineSettings, build_workflow
from wm.errors import PermanentError, TransientError


@pytest.fixture
def stack() -> ArgoStack:
    return argo_stack()


@pytest.fixture
def argo_settings(live_settings: Settings, stack: ArgoStack) -> Settings:
    return stack.settings(live_settings)


@pytest.fixture
async def engine(argo_settings: Settings) -> AsyncIterator[ArgoEngine]:
    """The engine under test, closed afterwards."""
    built = ArgoEngine(ArgoEngineSettings.of(argo_settings))
    yield built
    built.close()


def application(timeout_s: int = 60, gpu: int = 0, **engine_argo: Any) -> ApplicationDefinition:
    """An Argo application; ``engine_argo`` sets its ``engine.argo`` options."""
    return ApplicationDefinition.model_validate(
        {
            "name": "liver-seg",
            "version": "1",
            "map": {"image": "registry/liver:1", "command": ["--fast"], "timeout_s": timeout_s, "gpu": gpu},
            "engine": {"name": "argo", "argo": engine_argo},
        }
    )


def job(app: ApplicationDefinition | None = None, deadline_in_s: float = 120) -> JobSpec:
    """A job with an id of its own (workflows outlive a test run in the stack's etcd)."""
    job_id = f"t-{uuid.uuid4().hex[:12]}"
    return JobSpec(
        job_id=job_id,
        correlation_id="corr-1",
        application=app or application(),
        input_prefix=f"jobs/{job_id}/input",
        output_prefix=f"jobs/{job_id}/output",
        deadline=datetime.now(UTC) + timedelta(seconds=deadline_in_s),
    )


async def wait_status(
    engine: ArgoEngine,
    engine_job_id: str,
    until: tuple[str, ...] = ("succeeded", "failed", "error"),
    timeout_s: float = 60.0,
) -> list[EngineStatus]:
    """Poll ``status`` until its phase is in ``until``; every distinct status seen, in order."""
    seen: list[EngineStatus] = []
    give_up = time.monotonic() + timeout_s
    while not (seen and seen[-1].phase in until):
        assert time.monotonic() < give_up, f"not {until} after {timeout_s}s: {seen}"
        current = await engine.status(engine_job_id)
        if not seen or seen[-1] != current:
            seen.append(current)
        await asyncio.sleep(0.1)
    return seen


async def stage_inputs(settings: Settings, spec: JobSpec, count: int = 2) -> list[str]:
    async with ObjectStore(settings.object_store) as objects:
        for index in range(count):
            await objects.put_stream(f"{spec.input_prefix}/f{index}.dcm", _bytes(b"dicom %d" % index), 7)
        return [ref.key for ref in await objects.list(spec.input_prefix + "/")]


def _bytes(data: bytes) -> Any:
    import io

    return io.BytesIO(data)


async def workflow_template(stack: ArgoStack, annotations: dict[str, str]) -> str:
    """A WorkflowTemplate whose one pod carries ``annotations`` (the kwok stages read them)."""
    name = f"wt-{uuid.uuid4().hex[:10]}"
    body = {
        "apiVersion": "argoproj.io/v1alpha1",
        "kind": "WorkflowTemplate",
        "metadata": {"name": name},
        "spec": {
            "entrypoint": "main",
            "arguments": {"parameters": [{"name": "job-id"}]},
            "templates": [
                {
                    "name": "main",
                    "metadata": {"annotations": annotations},
                    "container": {"image": "registry/liver:1", "args": ["{{workflow.parameters.job-id}}"]},
                }
            ],
        },
    }
    async with stack.kube() as kube:
        await kube.create(f"{ARGO_GROUP}/namespaces/{stack.namespace}/workflowtemplates", body)
    return name


async def test_a_generated_workflow_runs_to_success_with_its_outputs(
    engine: ArgoEngine, argo_settings: Settings, stack: ArgoStack
) -> None:
    spec = job()
    inputs = await stage_inputs(argo_settings, spec)
    engine_job_id = await engine.launch(spec)
    assert engine_job_id == f"{stack.namespace}/{spec.job_id}"
    async with Executor(stack, argo_settings, selector=f"mwm.job-id={spec.job_id}").running():
        seen = await wait_status(engine, engine_job_id)
    assert seen[-1].phase == "succeeded", seen
    assert {status.phase for status in seen} <= {"pending", "running", "succeeded"}
    assert [ref.key for ref in seen[-1].outputs] == [spec.output_prefix]
    async with ObjectStore(argo_settings.object_store) as objects:
        outputs = [ref.key for ref in await objects.list(spec.output_prefix + "/")]
    assert outputs == [key.replace("/input/", "/output/") for key in inputs]


async def test_the_controller_runs_the_workflow_the_engine_built(
    engine: ArgoEngine, argo_settings: Settings, stack: ArgoStack
) -> None:
    spec = job()
    await engine.launch(spec)
    async with stack.kube() as kube:
        stored = await kube.get(workflow_path(stack.namespace, spec.job_id))
        assert stored is not None
        pods = await _pods(stack, spec.job_id)
    expected = build_workflow(spec, ArgoEngineSettings.of(argo_settings), datetime.now(UTC))
    assert stored["metadata"]["labels"].items() >= expected["metadata"]["labels"].items()
    assert stored["spec"]["serviceAccountName"] == "mwm-workflow"
    assert stored["spec"]["templates"][0]["container"]["args"] == ["--fast"]
    assert abs(stored["spec"]["activeDeadlineSeconds"] - expected["spec"]["activeDeadlineSeconds"]) <= 2
    [pod] = pods
    main = next(container for container in pod["spec"]["containers"] if container["name"] == "main")
    # Argo's emissary puts its own binary first and the image's entrypoint (from the controller's
    # `images` list here, the registry in a cluster) before the args: the MAP's entrypoint is kept.
    assert main["command"][0].endswith("argoexec") and main["args"][-1] == "--fast", main
    assert pod["spec"]["serviceAccountName"] == "mwm-workflow"
    await engine.cancel(f"{stack.namespace}/{spec.job_id}")


async def _pods(stack: ArgoStack, workflow: str, timeout_s: float = 30) -> list[dict[str, Any]]:
    """The workflow's pods, once there are some."""
    give_up = time.monotonic() + timeout_s
    async with stack.kube() as kube:
        while True:
            pods = await kube.items(
                f"/api/v1/namespaces/{stack.namespace}/pods", f"workflows.argoproj.io/workflow={workflow}"
            )
            if pods and all(pod["spec"].get("nodeName") for pod in pods):
                return pods
            assert time.monotonic() < give_up, f"no scheduled pod of {workflow} after {timeout_s}s: {pods}"
            await asyncio.sleep(0.2)


async def test_a_named_workflow_template_is_checked_and_run(engine: ArgoEngine, stack: ArgoStack) -> None:
    missing = application(namespace=stack.namespace, workflow_template="no-such-template")
    assert await engine.validate(missing) == [
        f"workflow template no-such-template not found in namespace {stack.namespace}"
    ]
    template = await workflow_template(stack, {})
    app = application(namespace=stack.namespace, workflow_template=template)
    assert await engine.validate(app) == []
    engine_job_id = await engine.launch(job(app))
    seen = await wait_status(engine, engine_job_id)
    assert seen[-1] == EngineStatus("succeeded", seen[-1].message, [])


async def test_a_failed_pod_fails_the_job_with_the_controllers_message(
    engine: ArgoEngine, stack: ArgoStack
) -> None:
    template = await workflow_template(stack, {"kwok.test/fail": "true"})
    engine_job_id = await engine.launch(
        job(application(namespace=stack.namespace, workflow_template=template))
    )
    final = (await wait_status(engine, engine_job_id))[-1]
    assert (final.phase, final.message) == ("failed", "main: Error (exit code 1)")


async def test_cancel_stops_then_terminates_and_leaves_finished_or_missing_ones_alone(
    engine: ArgoEngine, stack: ArgoStack
) -> None:
    template = await workflow_template(stack, {"kwok.test/delay": "600s"})
    spec = job(application(namespace=stack.namespace, workflow_template=template))
    engine_job_id = await engine.launch(spec)
    await wait_status(engine, engine_job_id, until=("running",))
    await engine.cancel(engine_job_id)
    final = (await wait_status(engine, engine_job_id))[-1]
    assert final.phase == "failed" and "Stopped with strategy" in final.message, final
    async with stack.kube() as kube:
        stored = await kube.get(workflow_path(stack.namespace, spec.job_id))
    assert stored is not None and stored["spec"]["shutdown"] in ("Stop", "Terminate")
    await engine.cancel(engine_job_id)  # finished: Argo refuses to shut it down again, not an error
    await engine.cancel(f"{stack.namespace}/no-such-workflow")
    assert (await engine.status(engine_job_id)).phase == "failed"


async def test_a_workflow_the_server_rejects_is_a_permanent_error(
    engine: ArgoEngine, stack: ArgoStack
) -> None:
    app = application(namespace=stack.namespace, workflow_template="no-such-template")
    with pytest.raises(PermanentError, match="no-such-template"):
        await engine.launch(job(app))


async def test_the_argo_server_down_and_back(
    engine: ArgoEngine, argo_settings: Settings, stack: ArgoStack
) -> None:
    spec = job()
    engine_job_id = await engine.launch(spec)
    stack_command("stop", "server")
    try:
        with pytest.raises(TransientError, match="unreachable"):
            await engine.status(engine_job_id)
        [problem] = await engine.validate(application())
        assert "unreachable" in problem
    finally:
        stack_command("start", "server")
    async with Executor(stack, argo_settings, selector=f"mwm.job-id={spec.job_id}").running():
        assert (await wait_status(engine, engine_job_id))[-1].phase == "succeeded"


async def test_a_second_launch_of_a_job_is_the_same_workflow(engine: ArgoEngine, stack: ArgoStack) -> None:
    spec = job()
    first = await engine.launch(spec)
    assert await engine.launch(spec) == first
    async with stack.kube() as kube:
        listed = await kube.items(workflow_path(stack.namespace), f"mwm.job-id={spec.job_id}")
    assert [item["metadata"]["name"] for item in listed] == [spec.job_id]
    await engine.cancel(first)


async def test_validate_lints_the_generated_workflow(engine: ArgoEngine) -> None:
    assert await engine.validate(application()) == []
    no_image = ApplicationDefinition.model_validate(
        {"name": "a", "version": "1", "map": {"command": ["x"]}, "engine": {"name": "argo"}}
    )
    [problem] = await engine.validate(no_image)
    assert problem.startswith("map.image is required")


@pytest.mark.parametrize("token", ["", "not-a-token"])
async def test_the_server_refuses_a_missing_or_wrong_token(
    argo_settings: Settings, stack: ArgoStack, token: str
) -> None:
    anonymous = ArgoEngine(ArgoEngineSettings.of(stack.settings(argo_settings, token=token)))
    spec = job()
    try:
        with pytest.raises(PermanentError, match="401"):
            await anonymous.launch(spec)
        # (Argo's lint needs no credentials; reading a WorkflowTemplate does.)
        [problem] = await anonymous.validate(application(namespace=stack.namespace, workflow_template="any"))
        assert "401" in problem
    finally:
        anonymous.close()
    async with stack.kube() as kube:
        assert await kube.get(workflow_path(stack.namespace, spec.job_id)) is None


async def test_cleanup_deletes_the_workflow_and_its_pods(
    engine: ArgoEngine, argo_settings: Settings, stack: ArgoStack
) -> None:
    spec = job()
    engine_job_id = await engine.launch(spec)
    async with Executor(stack, argo_settings, selector=f"mwm.job-id={spec.job_id}").running():
        await wait_status(engine, engine_job_id)
    assert await _pods(stack, spec.job_id)
    await engine.cleanup(engine_job_id)
    await engine.cleanup(engine_job_id)
    status = await engine.status(engine_job_id)
    assert (status.phase, status.message) == (
        "error",
        f"workflow {spec.job_id} not found in namespace {stack.namespace}",
    )
    give_up = time.monotonic() + 30
    async with stack.kube() as kube:
        while await kube.items(
            f"/api/v1/namespaces/{stack.namespace}/pods", f"workflows.argoproj.io/workflow={spec.job_id}"
        ):
            assert time.monotonic() < give_up, "the workflow's pods outlived it (garbage collector)"
            await asyncio.sleep(0.2)


async def test_the_servers_certificate_is_verified_with_the_configured_ca(
    argo_settings: Settings, stack: ArgoStack
) -> None:
    untrusting = ArgoEngine(ArgoEngineSettings.of(stack.settings(argo_settings, ca_cert="", retries=0)))
    try:
        with pytest.raises(TransientError, match="CERTIFICATE_VERIFY_FAILED"):
            await untrusting.status(f"{stack.namespace}/any")
    finally:
        untrusting.close()
