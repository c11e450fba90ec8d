"""Orchestration latency on the Argo engine, side by side with the local engine in the same run.

    python bench/argo_latency.py [--buckets 50]

Needs the services and the Argo stack (``bash scripts/services up`` starts both once
``scripts/argo-stack build`` has run). The real scheduler and monitor run in this process, as in
``scheduler_latency.py``; N buckets of one small CT file each go out one at a time (the next bucket.ready
after the previous job.finished), first on the ``local`` engine (command ``true``), then on the ``argo``
engine (a real Argo Server and workflow-controller; kwok finishes the pod after its 1 s stage, and
``devkit.argo_stack.Executor`` reports the outputs as Argo's executor would):

- bucket.ready -> job.launched: from just before the publish to the arrival of ``job.launched`` on a tap
  queue (for Argo: the workflow's create through the Argo Server included).
- engine terminal -> job.finished: local, from the runner's last write of its status file (its mtime);
  Argo, from the moment a watch on the workflows sees the workflow's phase turn ``Succeeded`` (Argo's own
  ``finishedAt`` has whole seconds only) to the arrival of ``job.finished``. Both are bounded below by the
  monitor's poll interval (``MWM_MONITOR__POLL_INTERVAL_S``).

Prints p50 and p99 rows, the Argo figure as "MWM" and the local engine's as the baseline.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import ssl
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python bench/argo_latency.py` from anywhere
    sys.path.insert(0, str(REPO))

from bus_hop import bench_settings, wait_for_services  # noqa: E402
from scheduler_latency import APPLICATION, arrival, finish_delay, percentile, ready_events  # noqa: E402

from consumers import monitor, scheduler  # noqa: E402
from devkit.argo_stack import (  # noqa: E402
    ArgoStack,
    Executor,
    argo_stack,
    forget_workflows,
    workflow_path,
)
from devkit.pipeline import (  # noqa: E402
    consumers_running,
    mip_application,
    register,
    tap,
    wait_until_consuming,
)
from devkit.services import cleanup  # noqa: E402
from schemas.events import BucketReady, JobFinished, JobLaunched  # noqa: E402
from wm.adapters.rabbitmq import Bus  # noqa: E402
from wm.config import Settings  # noqa: E402
from wm.domain.jobs import job_id_for  # noqa: E402
from wm.logging import configure_logging  # noqa: E402
from wm.runtime import Consumer  # noqa: E402

Latencies = tuple[list[float], list[float]]


@contextlib.asynccontextmanager
async def succeeded_seen(stack: ArgoStack) -> AsyncIterator[dict[str, float]]:
    """``{workflow name: time.time() when a watch first saw it Succeeded}``, filled while the block runs."""
    seen: dict[str, float] = {}

    async def watch() -> None:
        async with httpx.AsyncClient(
            base_url=stack.kube_url,
            verify=ssl.create_default_context(cafile=stack.kube_ca),
            headers={"Authorization": f"Bearer {stack.admin_token}"},
            timeout=httpx.Timeout(10, read=None),
        ) as client:
            while True:  # a watch the API server closes is opened again
                params = {"watch": "1", "labelSelector": f"mwm.application={APPLICATION}"}
                async with client.stream("GET", workflow_path(stack.namespace), params=params) as lines:
                    async for line in lines.aiter_lines():
                        workflow = json.loads(line)["object"]
                        name = workflow["metadata"]["name"]
                        if (workflow.get("status") or {}).get("phase") == "Succeeded":
                            seen.setdefault(name, time.time())

    task = asyncio.create_task(watch())
    try:
        yield seen
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def measure(settings: Settings, ready: list[BucketReady], stack: ArgoStack | None) -> Latencies:
    """(launch latencies, finish delays) in ms on the local engine, or on Argo when ``stack`` is given."""
    launches: list[float] = []
    finishes: list[float] = []
    consumers: list[Consumer[Any]] = [scheduler.CONSUMER, monitor.CONSUMER]
    async with contextlib.AsyncExitStack() as running:
        events = await running.enter_async_context(
            tap(settings, JobLaunched.event_type, JobFinished.event_type)
        )
        await running.enter_async_context(consumers_running(settings, consumers))
        bus = await running.enter_async_context(Bus(settings.bus))
        succeeded: dict[str, float] = {}
        if stack:
            executor = Executor(stack, settings, selector=f"mwm.application={APPLICATION}")
            await running.enter_async_context(executor.running(interval=0.05))
            succeeded = await running.enter_async_context(succeeded_seen(stack))
        await wait_until_consuming(settings, consumers)
        for event in ready:
            job_id = job_id_for(event.bucket_id)
            published = time.time()
            await bus.publish(event)
            launches.append(1000 * (await arrival(events, JobLaunched, job_id) - published))
            if stack is None:
                finishes.append(await finish_delay(settings, events, job_id))
                continue
            received = await arrival(events, JobFinished, job_id)
            [finished] = [e for e in events.of(JobFinished) if e.job_id == job_id]
            if finished.status != "succeeded":
                raise RuntimeError(f"job {job_id} ended {finished.status}: {finished.message}")
            finishes.append(1000 * (received - succeeded[job_id]))
    return launches, finishes


async def one_engine(work: Path, buckets: int, stack: ArgoStack | None) -> Latencies:
    settings = bench_settings(work / "work")
    if stack:
        settings = stack.settings(settings, retries=3, request_timeout_s=10.0)
    await wait_for_services(settings)
    try:
        definition = mip_application(APPLICATION, command=["true"])
        if stack:
            definition["map"] = {"image": "registry/bench:1", "timeout_s": 300}
            definition["engine"] = {"name": "argo", "argo": {}}
        await register(settings, definition)
        if stack:
            await forget_workflows(stack, APPLICATION)
        return await measure(settings, await ready_events(settings, work / "studies", buckets), stack)
    finally:
        await cleanup(settings)


def rows(name: str, argo: list[float], local: list[float]) -> list[str]:
    """p50 and p99 rows: Argo as MWM, the local engine as the baseline."""
    result = []
    for label, pick in (("p50", statistics.median), ("p99", lambda v: percentile(v, 0.99))):
        a, b = pick(argo), pick(local)
        result.append(f"| {name} {label} | argo {a:.0f} ms | local {b:.0f} ms | {a / b:.1f} | - |")
    return result


async def main(buckets: int) -> int:
    configure_logging(Settings().observability.log_format, "WARNING")
    stack = argo_stack()
    with tempfile.TemporaryDirectory(prefix="mwm-bench-") as work_dir:
        local = await one_engine(Path(work_dir) / "local", buckets, None)
        argo = await one_engine(Path(work_dir) / "argo", buckets, stack)
    poll = Settings().monitor.poll_interval_s
    label = f"({buckets} jobs, poll {poll} s)"
    for row in [
        *rows(f"bucket.ready -> job.launched {label}", argo[0], local[0]),
        *rows(f"engine terminal -> job.finished {label}", argo[1], local[1]),
    ]:
        print(row)
    for name, (launches, finishes) in (("argo", argo), ("local", local)):
        print(
            f"{name}: launch ms min {min(launches):.1f} max {max(launches):.1f}; "
            f"finish ms min {min(finishes):.1f} max {max(finishes):.1f}",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--buckets", type=int, default=50, help="jobs per engine (default 50)")
    sys.exit(asyncio.run(main(parser.parse_args().buckets)))
