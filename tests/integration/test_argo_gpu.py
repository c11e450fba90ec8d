"""GPU applications (the MAP's ``gpu``) on the real Argo stack: a fake node advertising ``nvidia.com/gpu``."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest

from devkit.argo_stack import ArgoStack, Executor, argo_stack, workflow_path
from tests.integration.test_argo_engine import _pods, application, job, wait_status
from wm.config import Settings
from wm.engines.argo import ArgoEngine
from wm.engines.argo_workflow import ArgoEngineSettings

GPU_NODE = "kwok-gpu-0"


@pytest.fixture
def stack() -> ArgoStack:
    return argo_stack()


@pytest.fixture
async def gpu_node(stack: ArgoStack) -> AsyncIterator[str]:
    """A kwok node with two GPUs, beside the stack's CPU-only one; removed afterwards."""
    resources = {"cpu": "16", "memory": "64Gi", "pods": "110", "nvidia.com/gpu": "2"}
    node = {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": GPU_NODE,
            "annotations": {"kwok.x-k8s.io/node": "fake", "node.alpha.kubernetes.io/ttl": "0"},
            "labels": {"kubernetes.io/hostname": GPU_NODE, "type": "kwok", "nvidia.com/gpu.present": "true"},
        },
        "status": {"allocatable": resources, "capacity": resources},
    }
    async with stack.kube() as kube:
        await kube.create("/api/v1/nodes", node)
    yield GPU_NODE
    async with stack.kube() as kube:
        await kube.delete(f"/api/v1/nodes/{GPU_NODE}")


@pytest.fixture
def engine(live_settings: Settings, stack: ArgoStack) -> Iterator[ArgoEngine]:
    built = ArgoEngine(ArgoEngineSettings.of(stack.settings(live_settings)))
    yield built
    built.close()


async def test_a_gpu_application_lands_only_on_the_gpu_node(
    engine: ArgoEngine, stack: ArgoStack, live_settings: Settings, gpu_node: str
) -> None:
    specs = [job(application(gpu=1)) for _ in range(2)]
    ids = [await engine.launch(spec) for spec in specs]
    selector = f"mwm.job-id in ({','.join(spec.job_id for spec in specs)})"
    async with Executor(stack, stack.settings(live_settings), selector=selector).running():
        for engine_job_id in ids:
            assert (await wait_status(engine, engine_job_id))[-1].phase == "succeeded"
    for spec in specs:
        [pod] = await _pods(stack, spec.job_id)
        assert pod["spec"]["nodeName"] == gpu_node
        main = next(c for c in pod["spec"]["containers"] if c["name"] == "main")
        assert main["resources"]["limits"]["nvidia.com/gpu"] == "1"


async def test_a_gpu_job_no_node_can_take_fails_saying_it_could_not_be_scheduled(
    live_settings: Settings, stack: ArgoStack, gpu_node: str
) -> None:
    engine = ArgoEngine(ArgoEngineSettings.of(stack.settings(live_settings, unschedulable_timeout_s=3.0)))
    try:
        spec = job(application(gpu=4, timeout_s=120))  # the node has 2
        engine_job_id = await engine.launch(spec)
        seen = await wait_status(engine, engine_job_id, timeout_s=60)
    finally:
        engine.close()
    assert seen[-1].phase == "failed", seen
    assert "could not be scheduled in" in seen[-1].message and "nvidia.com/gpu" in seen[-1].message, seen
    assert any(not s.terminal and "Insufficient nvidia.com/gpu" in s.message for s in seen), seen
    async with stack.kube() as kube:
        stored = await kube.get(workflow_path(stack.namespace, spec.job_id))
    assert stored is not None and stored["spec"].get("shutdown") in ("Stop", "Terminate"), "not left running"
