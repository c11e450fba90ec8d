"""Discovery: the delay between the end of a bucket's quiet period and its ``bucket.ready``.

    python bench/discovery_delay.py [--studies 50] [--files 3] [--spacing 0.1] [--quiet-period 1.0]
                                    [--feeder process|inline]

Runs the real discovery consumer in this process (``wm.runtime.run_consumers``, with its in-memory timers
and its database sweep) on the real services, with this run's own exchange, queues, database and bucket,
and an application mapped to an AE title. N small generated CT studies (``--files`` files each) arrive as
the gateway would deliver them (stored in the object store, one ``payload.arrived`` per file,
`devkit.pipeline.arrive`), study ``i`` starting ``i * spacing`` seconds after the first, so buckets
open and close while others are still filling. The feeder runs in a process of its own, as the gateway
does (``--feeder inline``: on the consumer's event loop, competing with it).

For every bucket: the delay from the end of its quiet period (``quiet_period_s`` after the ``arrived_at``
of its latest file, as recorded in ``bucket_files``) to the arrival of its ``bucket.ready`` on a tap queue.
It covers the timer's wake-up, the closure (unique insert, sealing the member files, the outbox write), the
publish with confirm and the broker's delivery. Target: p99 under 100 ms. A breakdown (timer lateness:
``closed_at - closes_at``; closure and publish: arrival - ``closed_at``) goes to stderr.

Prints one markdown row (an absolute target: no baseline, no ratio); a summary on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python bench/discovery_delay.py` from anywhere
    sys.path.insert(0, str(REPO))

from bus_hop import bench_settings, wait_for_services  # noqa: E402
from scheduler_latency import percentile  # noqa: E402

from consumers import discovery  # noqa: E402
from devkit.dicom import write_ct_study  # noqa: E402
from devkit.pipeline import arrive, consumers_running, mip_application, register, tap  # noqa: E402
from devkit.services import cleanup, settings_env  # noqa: E402
from schemas.events import BucketReady  # noqa: E402
from wm.adapters.mongo import Database  # noqa: E402
from wm.config import Settings  # noqa: E402
from wm.logging import configure_logging  # noqa: E402
from wm.stores.buckets import BUCKETS, FILES  # noqa: E402

APPLICATION = "bench-discovery"
AET = "MWM-BENCH"
TARGET_MS = 100.0
EVENT_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class Delay:
    """One bucket's delays, in ms after its quiet period ended."""

    bucket_id: str
    received_ms: float
    closed_ms: float


def write_studies(work: Path, count: int, files: int) -> list[list[Path]]:
    """``count`` distinct small CT studies of ``files`` files each."""
    return [
        write_ct_study(work / f"s{index}", slices_per_series=files, rows=16, columns=16, seed=index).files
        for index in range(count)
    ]


async def feed(settings: Settings, studies: list[list[Path]], spacing_s: float) -> None:
    """Study ``i`` arrives from ``i * spacing_s`` on, its files one after the other."""

    async def one(index: int, files: list[Path]) -> None:
        await asyncio.sleep(index * spacing_s)
        await arrive(settings, files, called_ae=AET, payload_id=f"bench-{index}")

    await asyncio.gather(*(one(index, files) for index, files in enumerate(studies)))


async def feed_in_process(settings: Settings, studies: list[list[Path]], spacing_s: float) -> None:
    """``feed`` in a child process (as a gateway delivers files: not on the consumer's event loop)."""
    plan = json.dumps({"studies": [[str(path) for path in files] for files in studies], "spacing": spacing_s})
    child = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "--feed", plan, env=settings_env(settings)
    )
    if await child.wait() != 0:
        raise RuntimeError(f"the feeder exited with {child.returncode}")


async def quiet_period_ends(settings: Settings) -> dict[str, datetime]:
    """When each bucket's quiet period ended: ``quiet_period_s`` after its latest file arrived."""
    async with Database(settings.mongo) as database:
        buckets = await database.collection(BUCKETS).find({}, {"quiet_period_s": 1}).to_list(None)
        files = await database.collection(FILES).find({}, {"bucket_id": 1, "arrived_at": 1}).to_list(None)
    latest: dict[str, datetime] = {}
    for document in files:
        bucket_id = str(document["bucket_id"])
        latest[bucket_id] = max(latest.get(bucket_id, document["arrived_at"]), document["arrived_at"])
    return {
        str(bucket["_id"]): latest[str(bucket["_id"])] + timedelta(seconds=bucket["quiet_period_s"])
        for bucket in buckets
        if str(bucket["_id"]) in latest
    }


async def measure(
    settings: Settings, studies: list[list[Path]], spacing_s: float, inline: bool = False
) -> list[Delay]:
    """Feed the studies to a running discovery consumer; each bucket's delays."""
    async with tap(settings, BucketReady.event_type) as events:
        async with consumers_running(settings, [discovery.CONSUMER]):
            await (feed if inline else feed_in_process)(settings, studies, spacing_s)
            await events.wait_for(BucketReady, len(studies), EVENT_TIMEOUT_S)
        received = list(zip(events.events, events.received_at, strict=True))
    ends = await quiet_period_ends(settings)
    return [
        Delay(
            event.bucket_id,
            1000 * (at - ends[event.bucket_id].timestamp()),
            1000 * (event.closed_at - ends[event.bucket_id]).total_seconds(),
        )
        for event, at in received
        if isinstance(event, BucketReady)
    ]


def summary(values: list[float]) -> str:
    """p50, p99 and max of ``values`` (ms)."""
    p50, p99 = statistics.median(values), percentile(values, 0.99)
    return f"p50 {p50:.1f} ms, p99 {p99:.1f} ms, max {max(values):.1f} ms"


async def main(arguments: argparse.Namespace) -> int:
    configure_logging(Settings().observability.log_format, "WARNING")
    with tempfile.TemporaryDirectory(prefix="mwm-bench-") as work_dir:
        settings = bench_settings(Path(work_dir) / "work")
        await wait_for_services(settings)
        try:
            definition = mip_application(APPLICATION, AET, quiet_period_s=arguments.quiet_period)
            await register(settings, definition)
            studies = write_studies(Path(work_dir) / "studies", arguments.studies, arguments.files)
            delays = await measure(settings, studies, arguments.spacing, arguments.feeder == "inline")
        finally:
            await cleanup(settings)
    received = [delay.received_ms for delay in delays]
    p50, p99 = statistics.median(received), percentile(received, 0.99)
    label = (
        f"{len(delays)} buckets of {arguments.files} files, quiet period {arguments.quiet_period} s, "
        f"sweep {settings.discovery.sweep_interval_s} s, feeder {arguments.feeder}"
    )
    print(
        f"| bucket.ready delay after the quiet period ({label}) | mwm p50 {p50:.0f} ms, p99 {p99:.0f} ms "
        f"| - | - | target p99 < {TARGET_MS:.0f} ms |"
    )
    print(f"quiet period end -> bucket.ready received: {summary(received)}", file=sys.stderr)
    print(f"quiet period end -> closed_at (timer): {summary([d.closed_ms for d in delays])}", file=sys.stderr)
    closing = [d.received_ms - d.closed_ms for d in delays]
    print(f"closed_at -> received (seal, publish, delivery): {summary(closing)}", file=sys.stderr)
    return 0


async def feed_only(plan: str) -> int:
    """The child process of ``feed_in_process``: its settings come from the environment."""
    studies = json.loads(plan)
    await feed(
        Settings(), [[Path(path) for path in files] for files in studies["studies"]], studies["spacing"]
    )
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--feed"]:
        sys.exit(asyncio.run(feed_only(sys.argv[2])))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=50, help="studies, one bucket each (default 50)")
    parser.add_argument("--files", type=int, default=3, help="files per study (default 3)")
    parser.add_argument("--spacing", type=float, default=0.1, help="seconds between study starts")
    parser.add_argument("--quiet-period", type=float, default=1.0, help="the application's quiet period")
    parser.add_argument(
        "--feeder", choices=("process", "inline"), default="process", help="where the files are fed from"
    )
    sys.exit(asyncio.run(main(parser.parse_args())))
