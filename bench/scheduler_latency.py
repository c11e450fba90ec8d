"""Orchestration latency: bucket.ready -> job.launched, and engine terminal state -> job.finished.

    python bench/scheduler_latency.py [--buckets 50]

Runs the real scheduler and monitor in this process (``wm.runtime.run_consumers``) on the real services,
with this run's own exchange, queues, database and bucket, and an application on the ``local`` engine
whose command is ``true`` (so the application's own work is nil). For each of N buckets it uploads one
small generated CT file to the object store as the gateway would, builds the ``BucketReady`` the discovery
consumer would (``wm.domain.discovery.bucket_ready``) and publishes it, one job at a time (the next
bucket.ready after the previous job.finished, so runners of earlier jobs do not compete for the CPU), once
the scheduler and the monitor are consuming (the first bucket would otherwise wait for their start-up):

- launch latency: from just before the publish to the arrival of that job's ``job.launched`` on a tap
  queue. It covers the scheduler's delivery, the job insert, staging (a server-side copy per file), the
  local engine's launch (writing the job spec and spawning its detached runner, not the runner's own
  start) and the publish of ``job.launched``. Target: p99 under 100 ms.
- finish delay: from the runner's last write of ``<work dir>/jobs/<job>/status.json`` (the moment the
  engine reports the terminal phase; its mtime) to the arrival of ``job.finished``. It covers the
  monitor's poll interval (``MWM_MONITOR__POLL_INTERVAL_S``), the status check, the listing of outputs,
  the job update and the publish. Target: p99 under 1 s.

Prints one markdown row per metric (absolute targets: no baseline, no ratio); a summary on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python bench/scheduler_latency.py` from anywhere
    sys.path.insert(0, str(REPO))

from bus_hop import bench_settings, wait_for_services  # noqa: E402

from consumers import monitor, scheduler  # noqa: E402
from devkit.dicom import write_ct_study  # noqa: E402
from devkit.pipeline import (  # noqa: E402
    EventTap,
    consumers_running,
    mip_application,
    register,
    tap,
    wait_until_consuming,
)
from devkit.services import cleanup  # noqa: E402
from schemas.events import BucketFile, BucketReady, JobFinished, JobLaunched  # noqa: E402
from wm.adapters.objectstore import ObjectStore  # noqa: E402
from wm.adapters.rabbitmq import Bus  # noqa: E402
from wm.config import Settings  # noqa: E402
from wm.dicom import read_identifiers  # noqa: E402
from wm.domain.discovery import Placement, bucket_ready  # noqa: E402
from wm.domain.jobs import job_id_for  # noqa: E402
from wm.engines.local import STATUS_FILE  # noqa: E402
from wm.logging import configure_logging  # noqa: E402

APPLICATION = "bench-latency"
LAUNCH_TARGET_MS = 100.0
FINISH_TARGET_MS = 1000.0
EVENT_TIMEOUT_S = 60.0


async def ready_events(settings: Settings, work: Path, count: int) -> list[BucketReady]:
    """One bucket per study of one small CT file, its file already in the object store."""
    events = []
    async with ObjectStore(settings.object_store) as objects:
        for index in range(count):
            [path] = write_ct_study(
                work / f"s{index}", slices_per_series=1, rows=16, columns=16, seed=index
            ).files
            dicom = read_identifiers(path)
            key = f"payloads/bench-{index}/{dicom.study_instance_uid}/{dicom.series_instance_uid}/x.dcm"
            ref = await objects.put_file(key, path)
            placement = Placement(APPLICATION, 1, "0020,000D", dicom.study_instance_uid, 0.1)
            now = datetime.now(UTC)
            files = [BucketFile(file=ref, dicom=dicom)]
            events.append(bucket_ready(placement.bucket_id(1), placement, f"bench-{index}", files, now, now))
    return events


async def arrival(events: EventTap, kind: type[JobLaunched | JobFinished], job_id: str) -> float:
    """When the tap received ``kind`` for ``job_id`` (waits for it)."""
    deadline = time.monotonic() + EVENT_TIMEOUT_S
    while True:
        for event, received in zip(events.events, events.received_at, strict=True):
            if isinstance(event, kind) and event.job_id == job_id:
                return received
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {kind.__name__} for {job_id} in {EVENT_TIMEOUT_S:.0f} s")
        await asyncio.sleep(0.001)


async def measure(settings: Settings, ready: list[BucketReady]) -> tuple[list[float], list[float]]:
    """(launch latencies, finish delays) in ms; each bucket.ready goes out after the previous job ended."""
    keys = (JobLaunched.event_type, JobFinished.event_type)
    launches: list[float] = []
    finishes: list[float] = []
    async with (
        tap(settings, *keys) as events,
        consumers_running(settings, [scheduler.CONSUMER, monitor.CONSUMER]),
        Bus(settings.bus) as bus,
    ):
        await wait_until_consuming(settings, [scheduler.CONSUMER, monitor.CONSUMER])
        for event in ready:
            job_id = job_id_for(event.bucket_id)
            published = time.time()
            await bus.publish(event)
            launches.append(1000 * (await arrival(events, JobLaunched, job_id) - published))
            finishes.append(await finish_delay(settings, events, job_id))
    return launches, finishes


async def finish_delay(settings: Settings, events: EventTap, job_id: str) -> float:
    """ms from the runner's terminal status write to the arrival of the job's ``job.finished``."""
    received = await arrival(events, JobFinished, job_id)
    [finished] = [event for event in events.of(JobFinished) if event.job_id == job_id]
    if finished.status != "succeeded":
        raise RuntimeError(f"job {job_id} ended {finished.status}: {finished.message}")
    written = (Path(settings.work_dir) / "jobs" / job_id / STATUS_FILE).stat().st_mtime
    return 1000 * (received - written)


def percentile(values: list[float], fraction: float) -> float:
    """The ``fraction`` quantile (nearest rank above)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def rows(name: str, values: list[float], target_ms: float) -> list[str]:
    """The p50 and p99 rows of one metric."""
    p50, p99 = statistics.median(values), percentile(values, 0.99)
    return [
        f"| {name} p50 | mwm {p50:.0f} ms | - | - | - |",
        f"| {name} p99 | mwm {p99:.0f} ms | - | - | target p99 < {target_ms:.0f} ms |",
    ]


async def main(buckets: int) -> int:
    defaults = Settings()
    configure_logging(defaults.observability.log_format, "WARNING")
    with tempfile.TemporaryDirectory(prefix="mwm-bench-") as work_dir:
        settings = bench_settings(Path(work_dir) / "work")
        await wait_for_services(settings)
        try:
            await register(settings, mip_application(APPLICATION, command=["true"]))
            ready = await ready_events(settings, Path(work_dir) / "studies", buckets)
            launches, finishes = await measure(settings, ready)
        finally:
            await cleanup(settings)
    label = f"({buckets} buckets, local engine, poll {settings.monitor.poll_interval_s} s)"
    for row in [
        *rows(f"bucket.ready -> job.launched {label}", launches, LAUNCH_TARGET_MS),
        *rows(f"engine terminal -> job.finished {label}", finishes, FINISH_TARGET_MS),
    ]:
        print(row)
    print(
        f"launch ms: min {min(launches):.1f} max {max(launches):.1f}; "
        f"finish ms: min {min(finishes):.1f} max {max(finishes):.1f}",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--buckets", type=int, default=50, help="bucket.ready events (default 50)")
    sys.exit(asyncio.run(main(parser.parse_args().buckets)))
