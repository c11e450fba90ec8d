"""Studies through discovery, scheduler and monitor onto the real Argo stack (``scripts/argo-stack``)."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import pytest

from consumers import discovery, monitor, scheduler
from devkit.argo_stack import (
    ArgoStack,
    Executor,
    argo_application,
    argo_stack,
    no_outputs,
    stack_command,
    workflow_path,
)
from devkit.dicom import write_ct_study
from devkit.pipeline import arrive, consumers_running, register, tap
from schemas.events import JobFinished, JobLaunched
from wm.adapters.objectstore import ObjectStore
from wm.config import Settings
from wm.runtime import Consumer

CONSUMERS: list[Consumer[Any]] = [discovery.CONSUMER, scheduler.CONSUMER, monitor.CONSUMER]


@pytest.fixture
def stack() -> ArgoStack:
    return argo_stack()


@pytest.fixture
def settings_on_argo(live_settings: Settings, stack: ArgoStack) -> Settings:
    """The test's settings with the Argo engine on the stack, a quick monitor and the production retry
    budget (it outlasts an Argo Server restart, as it does a broker's)."""
    on_argo = stack.settings(live_settings)
    monitor_settings = on_argo.monitor.model_copy(update={"poll_interval_s": 0.5})
    return on_argo.model_copy(update={"monitor": monitor_settings, "retry": Settings().retry})


async def test_ten_concurrent_jobs_survive_an_argo_server_restart(
    settings_on_argo: Settings, stack: ArgoStack, tmp_path: Path
) -> None:
    settings = settings_on_argo
    app = f"echo-{uuid.uuid4().hex[:8]}"
    # Ten studies at once on two cores: discovery may handle a study's second file more than half a second
    # after its first, and a study split over two generations rightly runs twice; not what this is about.
    await register(settings, argo_application(app, "MWM-ARGO", quiet_period_s=3.0))
    studies = [
        write_ct_study(tmp_path / f"s{i}", series=1, slices_per_series=2, seed=100 + i) for i in range(10)
    ]
    executor = Executor(stack, settings, selector=f"mwm.application={app}")
    async with (
        tap(settings, JobLaunched.event_type, JobFinished.event_type) as events,
        consumers_running(settings, CONSUMERS),
        executor.running(),
    ):
        for study in studies:
            await arrive(settings, study.files, called_ae="MWM-ARGO")
        await events.wait_for(JobLaunched, 5, 60)
        stack_command("restart", "server")  # mid-way: some jobs launched, others not yet
        finished = await events.wait_for(JobFinished, 10, 180)
        await asyncio.sleep(1.0)  # a duplicate would arrive now
    finished = events.of(JobFinished)
    assert len(finished) == 10 and len({event.job_id for event in finished}) == 10, "none lost or twice"
    assert {event.status for event in finished} == {"succeeded"}, [event.message for event in finished]
    async with stack.kube() as kube:
        workflows = await kube.items(workflow_path(stack.namespace), f"mwm.application={app}")
    assert sorted(w["metadata"]["labels"]["mwm.job-id"] for w in workflows) == sorted(
        e.job_id for e in finished
    )
    assert {w["status"]["phase"] for w in workflows} == {"Succeeded"}
    async with ObjectStore(settings.object_store) as objects:
        for event in finished:
            assert len(event.outputs) == 2
            assert [ref.key for ref in await objects.list(event.outputs[0].key.rsplit("/", 2)[0])] == [
                ref.key for ref in event.outputs
            ]


async def test_a_job_that_succeeds_without_outputs_says_so(
    settings_on_argo: Settings, stack: ArgoStack, tmp_path: Path
) -> None:
    settings = settings_on_argo
    app = f"quiet-{uuid.uuid4().hex[:8]}"
    await register(settings, argo_application(app, "MWM-QUIET"))
    study = write_ct_study(tmp_path / "s", series=1, slices_per_series=2, seed=7)
    executor = Executor(stack, settings, selector=f"mwm.application={app}", produce=no_outputs)
    async with (
        tap(settings, JobFinished.event_type) as events,
        consumers_running(settings, CONSUMERS),
        executor.running(),
    ):
        await arrive(settings, study.files, called_ae="MWM-QUIET")
        [finished] = await events.wait_for(JobFinished, 1, 90)
    assert finished.status == "succeeded" and finished.outputs == []
    assert "no outputs under" in finished.message and "nothing to export" in finished.message


async def test_a_job_past_its_deadline_times_out_and_its_workflow_is_terminated(
    settings_on_argo: Settings, stack: ArgoStack, tmp_path: Path
) -> None:
    """No executor reports the step's outputs, so the workflow runs on until MWM's deadline ends it.

    (The workflow's own ``activeDeadlineSeconds`` is enforced on a running pod by the kubelet, which kwok
    does not imitate: the monitor's deadline is what ends the job here, as it does when Argo is slow.)
    """
    settings = settings_on_argo
    app = f"slow-{uuid.uuid4().hex[:8]}"
    definition = argo_application(app, "MWM-SLOW")
    definition["map"]["timeout_s"] = 4
    await register(settings, definition)
    study = write_ct_study(tmp_path / "s", series=1, slices_per_series=1, seed=11)
    async with tap(settings, JobFinished.event_type) as events, consumers_running(settings, CONSUMERS):
        await arrive(settings, study.files, called_ae="MWM-SLOW")
        [finished] = await events.wait_for(JobFinished, 1, 90)
    assert finished.status == "timed_out" and "deadline" in finished.message, finished
    async with stack.kube() as kube:
        [workflow] = await kube.items(workflow_path(stack.namespace), f"mwm.application={app}")
    assert workflow["spec"].get("shutdown") == "Terminate"
    assert workflow["status"]["phase"] in ("Failed", "Running")  # Failed once the controller saw it
