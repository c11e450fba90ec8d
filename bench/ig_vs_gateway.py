"""The IG path against MWM's own gateway: from a study's arrival to its ``job.launched``.

    python bench/ig_vs_gateway.py [--payloads 20] [--slices 324] [--quiet-period 3.0]

Runs MWM in this process on the real services (this run's own exchange, queues, database and buckets):
the consumers ``ig-requests``, ``discovery`` and ``scheduler`` (local engine), and the DICOM gateway. A
generated CT study of ``--slices`` instances is sent ``--payloads`` times each way, alternating, each time
a study of its own (new Study, Series and SOP Instance UIDs, written before the timed part): MWM runs a
resent study again only when it brings new instances, so the same study twice would launch nothing.

- IG path: the IG emulator (``devkit/ig_emulator.py``) on a vhost of this run uploads the study to
  its own bucket (``.dcm`` and ``.dcm.json``, not timed), then publishes ``md.workflow.request``. Measured:
  from that publish to ``job.launched`` (identifiers from the ``.dcm.json`` files, the copy into MWM's
  bucket, one ``bucket.ready``, staging and the launch).
- Own gateway: dcmtk ``storescu`` sends the study to the gateway. Measured: from the last file's
  ``payload.arrived`` to ``job.launched``, minus the quiet period (the wait the IG's own assembler did
  before it published).

Target: the IG path adds no more than 200 ms at p99. Prints markdown rows; details on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python bench/ig_vs_gateway.py` from anywhere
    sys.path.insert(0, str(REPO))

from bus_hop import bench_settings, wait_for_services  # noqa: E402
from scheduler_latency import percentile  # noqa: E402

from consumers import discovery, ig_requests, scheduler  # noqa: E402
from devkit.dicom import write_ct_study  # noqa: E402
from devkit.ig_emulator import IgEmulator, vhost  # noqa: E402
from devkit.ig_loop import with_ig  # noqa: E402
from devkit.peers import LOCALHOST, astorescu, free_port  # noqa: E402
from devkit.pipeline import EventTap, consumers_running, mip_application, register, tap  # noqa: E402
from devkit.services import cleanup, wait_for  # noqa: E402
from producers.gateway import serving  # noqa: E402
from schemas.events import JobLaunched, PayloadArrived  # noqa: E402
from wm.logging import configure_logging  # noqa: E402
from wm.runtime import Consumer  # noqa: E402

TARGET_ADDED_MS = 200.0
IG_AET, GATEWAY_AET = "MONAI-BENCH", "MWM-BENCH"


async def launched_for(events: EventTap, correlation_id: str) -> JobLaunched:
    """The ``job.launched`` of the study with ``correlation_id`` (the last, if its bucket split)."""
    found: list[JobLaunched] = []

    async def arrived() -> bool:
        found[:] = [e for e in events.of(JobLaunched) if e.correlation_id == correlation_id]
        return bool(found)

    await wait_for(arrived, 300, f"job.launched of {correlation_id}")
    return found[-1]


def fresh_study(work: Path, name: str, slices: int, seed: int) -> list[Path]:
    """The files of a study no earlier round sent (its UIDs derive from ``seed``), in ``work/name``.

    The previous round's study there is removed first: the directory must hold this study alone.
    """
    shutil.rmtree(work / name, ignore_errors=True)
    study = write_ct_study(work / name, series=1, slices_per_series=slices, rows=128, columns=128, seed=seed)
    return study.files


def arrival_time(events: EventTap, event: object) -> float:
    return events.received_at[events.events.index(event)]  # type: ignore[arg-type]


async def via_ig(emulator: IgEmulator, files: list[Path], events: EventTap) -> float:
    """ms from the IG's ``md.workflow.request`` to ``job.launched``."""
    payload_id = str(uuid.uuid4())
    paths = await emulator.upload(files, payload_id, "CT", [])
    started = time.time()
    correlation_id = await emulator.publish_request(payload_id, paths, called_ae=IG_AET)
    job = await launched_for(events, correlation_id)
    return (arrival_time(events, job) - started) * 1000


async def via_gateway(
    address: tuple[str, int], study: Path, events: EventTap, files: int, quiet_s: float
) -> float:
    """ms from the last file's ``payload.arrived`` to ``job.launched``, minus the quiet period."""
    seen = len(events.of(PayloadArrived))
    result = await astorescu(*address, GATEWAY_AET, [study], calling_aet="CT", timeout=300)
    if result.returncode != 0:
        raise RuntimeError(result.stderr)
    arrived = await events.wait_for(PayloadArrived, seen + files, 120)
    last = max(arrival_time(events, event) for event in arrived[seen:])
    job = await launched_for(events, arrived[-1].correlation_id)
    return (arrival_time(events, job) - last - quiet_s) * 1000


async def run(payloads: int, slices: int, quiet_s: float, work: Path) -> tuple[list[float], list[float]]:
    base = bench_settings(work)
    await wait_for_services(base)
    name = f"ig-bench-{uuid.uuid4().hex[:6]}"
    async with vhost(base, name) as url:
        settings = with_ig(base, url, name)
        gateway = settings.gateway.model_copy(update={"host": LOCALHOST, "port": free_port()})
        settings = settings.model_copy(update={"gateway": gateway})
        application = mip_application(name="bench-ig", ae_title=GATEWAY_AET, quiet_period_s=quiet_s)
        application["ae_titles"] = [GATEWAY_AET, IG_AET]
        await register(settings, application)
        consumers: list[Consumer[Any]] = [ig_requests.CONSUMER, discovery.CONSUMER, scheduler.CONSUMER]
        ig_ms: list[float] = []
        gateway_ms: list[float] = []
        try:
            async with (
                IgEmulator("0.4", url, settings, bucket=settings.ig.bucket) as emulator,
                tap(settings, JobLaunched.event_type, PayloadArrived.event_type) as events,
                consumers_running(settings, consumers),
                serving(settings) as (server, _),
            ):
                for round_ in range(payloads + 1):  # round 0 warms up (connections, caches): not counted
                    ig_files = await asyncio.to_thread(fresh_study, work, "ig", slices, 2 * round_ + 1)
                    own_files = await asyncio.to_thread(fresh_study, work, "own", slices, 2 * round_ + 2)
                    ig = await via_ig(emulator, ig_files, events)
                    own = await via_gateway(server.address, own_files[0].parent, events, slices, quiet_s)
                    print(f"round {round_}: ig {ig:.0f} ms, gateway {own:.0f} ms", file=sys.stderr)
                    if round_:
                        ig_ms.append(ig)
                        gateway_ms.append(own)
        finally:
            await cleanup(settings)
    return ig_ms, gateway_ms


def report(ig_ms: list[float], gateway_ms: list[float], slices: int) -> list[str]:
    ig50, ig99 = statistics.median(ig_ms), percentile(ig_ms, 0.99)
    gw50, gw99 = statistics.median(gateway_ms), percentile(gateway_ms, 0.99)
    label = f"{len(ig_ms)} payloads of {slices} instances"
    return [
        f"| IG request -> job.launched ({label}) p50 | IG {ig50:.0f} ms | own gateway {gw50:.0f} ms | "
        f"adds {ig50 - gw50:.0f} ms | - |",
        f"| IG request -> job.launched ({label}) p99 | IG {ig99:.0f} ms | own gateway {gw99:.0f} ms | "
        f"adds {ig99 - gw99:.0f} ms | target adds <= {TARGET_ADDED_MS:.0f} ms |",
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--payloads", type=int, default=20)
    parser.add_argument("--slices", type=int, default=324)
    parser.add_argument("--quiet-period", type=float, default=3.0, help="long enough not to split a study")
    args = parser.parse_args()
    configure_logging("console", "WARNING")
    with tempfile.TemporaryDirectory(prefix="mwm-bench-ig-") as work:
        ig_ms, gateway_ms = asyncio.run(run(args.payloads, args.slices, args.quiet_period, Path(work)))
    for row in report(ig_ms, gateway_ms, args.slices):
        print(row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
