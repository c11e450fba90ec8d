"""Discovery against its history: a new study's closure and the sweep, on an empty database and a full one.

    python bench/discovery_history.py [--buckets 2000] [--files-per-bucket 10] [--study-files 30] [--rounds 5]

Two databases on the real MongoDB-wire server, one empty, one holding ``--buckets`` closed (and published)
buckets of ``--files-per-bucket`` files each (20,000 files by default): their bucket, file, slot, closure,
membership and seal documents, in the shapes ``wm.stores.buckets`` writes. On each, ``--rounds`` new studies
of
``--study-files`` files are added through ``BucketStore.add_file`` and closed with ``BucketStore.close``
(the closure: bucket look-up, closure insert, reading the bucket's files, the seal); the sweep
(``BucketStore.due`` and ``BucketStore.unpublished``, what each replica runs every second) is timed 20
times. The rounds alternate between the databases (which goes first too); the median of each is printed for
both, with the ratio full / empty (target: within noise of 1.0, issue #18). For comparison, stderr shows the
queries the hot paths used before: open buckets by ``{state, closes_at}`` and a bucket's files by
``{bucket_id}``, which scan on this server.

Prints one markdown row; a summary on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python bench/discovery_history.py` from anywhere
    sys.path.insert(0, str(REPO))

from _history import empty_and_full  # noqa: E402
from pymongo.errors import PyMongoError  # noqa: E402

from devkit.events import payload_arrived  # noqa: E402
from wm.adapters.mongo import Database  # noqa: E402
from wm.domain.discovery import Placement  # noqa: E402
from wm.logging import configure_logging  # noqa: E402
from wm.stores import bucket_index, buckets  # noqa: E402
from wm.stores.buckets import BucketStore, membership_id, seal_id  # noqa: E402

SWEEPS = 20
BATCH = 1000


def placement(value: str) -> Placement:
    return Placement("bench-history", 1, "StudyInstanceUID", value, 0.0)


async def seed_history(database: Database, bucket_count: int, files_per_bucket: int) -> None:
    """Closed, published buckets with their files, slots, closures, memberships and seals."""
    long_ago = datetime.now(UTC) - timedelta(days=1)
    rows: dict[str, list[dict[str, Any]]] = {name: [] for name in ("b", "f", "s", "c", "m")}
    for index in range(bucket_count):
        where = placement(f"1.2.840.99.{index}")
        bucket_id = where.bucket_id(1)
        rows["b"].append(
            {
                "_id": bucket_id,
                "key": where.bucket_key,
                "generation": 1,
                "state": "closed",
                "application": where.application,
                "revision": 1,
                "grouping_tag": where.grouping_tag,
                "grouping_value": where.grouping_value,
                "quiet_period_s": 0.0,
                "correlation_id": bucket_id,
                "opened_at": long_ago,
                "closes_at": long_ago,
                "closed_at": long_ago,
            }
        )
        rows["c"].append({"_id": bucket_id, "claimed_at": long_ago, "published_at": long_ago})
        rows["m"].append({"_id": seal_id(bucket_id), "bucket_id": bucket_id, "event": None})
        for number in range(files_per_bucket):
            event = payload_arrived(key=f"payloads/h{index}/{number}.dcm")
            fid = f"{where.bucket_key}:{event.file.key}"
            rows["f"].append(
                {
                    "_id": fid,
                    "bucket_id": bucket_id,
                    "arrived_at": long_ago,
                    "file": event.file.model_dump(mode="json"),
                    "dicom": event.dicom.model_dump(mode="json"),
                }
            )
            rows["s"].append(
                {"_id": bucket_index.slot_id(bucket_id, number), "bucket_id": bucket_id, "file_id": fid}
            )
            rows["m"].append(
                {
                    "_id": membership_id(fid, bucket_id),
                    "bucket_id": bucket_id,
                    "file_id": fid,
                    "winner": "closer",
                }
            )
    names = {
        "b": buckets.BUCKETS,
        "f": buckets.FILES,
        "s": bucket_index.SLOTS,
        "c": buckets.CLOSURES,
        "m": buckets.MEMBERSHIPS,
    }
    for short, documents in rows.items():
        collection = database.collection(names[short])
        for start in range(0, len(documents), BATCH):
            await collection.insert_many(documents[start : start + BATCH], ordered=False)


async def timed(work: Callable[[], Awaitable[object]]) -> float:
    started = time.perf_counter()
    await work()
    return (time.perf_counter() - started) * 1000


async def closure_ms(store: BucketStore, study_files: int) -> float:
    """Add a new study's files, then time its closure."""
    where = placement(f"1.2.840.77.{uuid.uuid4().int % 10**12}")
    for number in range(study_files):
        await store.add_file(where, payload_arrived(key=f"payloads/new-{uuid.uuid4().hex}/{number}.dcm"))
    now = datetime.now(UTC) + timedelta(seconds=1)
    elapsed = await timed(lambda: store.close(where.bucket_id(1), now))
    await store.mark_published(where.bucket_id(1))
    return elapsed


async def sweep_ms(store: BucketStore) -> float:
    now = datetime.now(UTC)
    return await timed(lambda: _sweep(store, now, timedelta(seconds=10)))


async def _sweep(store: BucketStore, now: datetime, lease: timedelta) -> None:
    await store.due(now)
    await store.unpublished(lease, now)


async def old_queries_ms(database: Database) -> tuple[float, float]:
    """What the sweep and a closure queried before issue #18 (scans on this server)."""
    due = database.collection(buckets.BUCKETS).find(
        {"state": "open", "closes_at": {"$lte": datetime.now(UTC)}}
    )
    files = database.collection(buckets.FILES).find({"bucket_id": "no-such-bucket"})
    return await _or_timeout(lambda: due.to_list(None)), await _or_timeout(lambda: files.to_list(None))


async def _or_timeout(work: Callable[[], Awaitable[object]]) -> float:
    """ms, or infinity when the query outlasted the client's socket timeout (a loaded machine)."""
    try:
        return await timed(work)
    except PyMongoError:
        return float("inf")


async def measure(empty: Database, full: Database, rounds: int, study_files: int) -> dict[str, list[float]]:
    """Closures and sweeps on both databases, alternating which goes first (the machine drifts)."""
    stores = {"empty": BucketStore(empty), "full": BucketStore(full)}
    times: dict[str, list[float]] = {f"{kind} {db}": [] for kind in ("closure", "sweep") for db in stores}
    for store in stores.values():  # warm-up, not counted
        await closure_ms(store, study_files)
    for round_number in range(max(rounds, SWEEPS)):
        order = list(stores.items()) if round_number % 2 == 0 else list(reversed(stores.items()))
        for name, store in order:
            if round_number < rounds:
                times[f"closure {name}"].append(await closure_ms(store, study_files))
            times[f"sweep {name}"].append(await sweep_ms(store))
    return times


async def run(arguments: argparse.Namespace) -> tuple[dict[str, list[float]], dict[str, tuple[float, float]]]:
    async with empty_and_full(buckets.INDEXES) as (empty, full):
        started = time.perf_counter()
        await seed_history(full, arguments.buckets, arguments.files_per_bucket)
        print(f"seeded the history in {time.perf_counter() - started:.1f} s", file=sys.stderr)
        times = await measure(empty, full, arguments.rounds, arguments.study_files)
        old = {"empty": await old_queries_ms(empty), "full": await old_queries_ms(full)}
    return times, old


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--buckets", type=int, default=2000)
    parser.add_argument("--files-per-bucket", type=int, default=10)
    parser.add_argument("--study-files", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=5)
    arguments = parser.parse_args()
    configure_logging("console", "WARNING")
    times, old = asyncio.run(run(arguments))
    files = arguments.buckets * arguments.files_per_bucket
    median = {name: statistics.median(values) for name, values in times.items()}
    for name in ("empty", "full"):
        print(
            f"{name}: closure {median['closure ' + name]:.1f} ms, sweep {median['sweep ' + name]:.1f} ms "
            f"(closures {', '.join(f'{v:.0f}' for v in times['closure ' + name])}); before #18 the sweep's "
            f"query took {old[name][0]:.1f} ms and a closure's files query {old[name][1]:.1f} ms",
            file=sys.stderr,
        )
    closure_ratio = median["closure full"] / median["closure empty"]
    sweep_ratio = median["sweep full"] / median["sweep empty"]
    print(
        f"| discovery vs history ({files} files, {arguments.buckets} closed buckets) "
        f"| closure {median['closure full']:.1f} ms, sweep {median['sweep full']:.1f} ms "
        f"| empty database: closure {median['closure empty']:.1f} ms, sweep {median['sweep empty']:.1f} ms "
        f"| ratio {closure_ratio:.2f} / {sweep_ratio:.2f} | target ~1.0 (within noise) |"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
