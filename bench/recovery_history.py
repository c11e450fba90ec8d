"""Recovery sweeps against their history: the exporter's lease sweep and claim, the monitor's finish sweep.

    python bench/recovery_history.py [--history 20000] [--open 10] [--rounds 20]

Two databases on the real MongoDB-wire server, one empty, one holding ``--history`` finished export tasks
(each with its lease) and as many published job-finish claims, in the shapes ``wm.stores.exports`` and
``wm.stores.jobs`` write; both hold ``--open`` open tasks held under live leases (work in progress). On
each, ``--rounds`` times, alternating which database goes first (the machine drifts):

- the exporter's sweep for expired leases (``ExportTasks.expire``, every exporter every 10 s);
- a pull client's claim (``ExportTasks.claim``) of a task created for the round, made final after;
- the monitor's look for stale finish claims (``JobStore.stale_finishes``, every 2.5 s with the 10 s
  lease), with one claim of the round that was never published.

The median of each is printed for both, with the ratio full / empty (target: within noise of 1.0, issue
#18). For comparison, stderr shows the queries these paths ran before: export tasks by state and lease,
finish claims by ``published_at``, which scan on this server.

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
if str(REPO) not in sys.path:  # `python bench/recovery_history.py` from anywhere
    sys.path.insert(0, str(REPO))

from _history import empty_and_full  # noqa: E402
from pymongo.errors import PyMongoError  # noqa: E402

from schemas.events import ExportRequested, FileRef, SinkRef  # noqa: E402
from wm.adapters.mongo import Database  # noqa: E402
from wm.domain.exports import ExportState, ExportTask, task_for  # noqa: E402
from wm.logging import configure_logging  # noqa: E402
from wm.stores import exports, jobs  # noqa: E402
from wm.stores.export_leases import EXPORT_LEASES, lease_id  # noqa: E402
from wm.stores.exports import ExportTasks  # noqa: E402
from wm.stores.jobs import JobStore  # noqa: E402

BATCH = 1000
SINK = "bench-pacs"
FINISH_LEASE = timedelta(seconds=10)


def task(task_id: str, now: datetime) -> dict[str, Any]:
    """An export task document of ``SINK`` with two files, as ``ExportTasks.create`` writes it."""
    files = [FileRef(bucket="mwm", key=f"jobs/{task_id}/output/{n}.dcm", size=1024) for n in range(2)]
    event = ExportRequested(
        correlation_id=task_id,
        export_task_id=task_id,
        job_id=task_id,
        application_id="bench",
        sink=SinkRef(name=SINK, type="dicom"),
        files=files,
    )
    document = task_for(event, now).model_dump(mode="python", exclude={"export_task_id"})
    return {"_id": task_id, **document}


async def seed(database: Database, history: int, open_tasks: int) -> None:
    """``history`` finished tasks with their leases and published finish claims; ``open_tasks`` held ones."""
    long_ago = datetime.now(UTC) - timedelta(days=1)
    rows: dict[str, list[dict[str, Any]]] = {exports.EXPORT_TASKS: [], EXPORT_LEASES: [], jobs.FINISHES: []}
    for index in range(history):
        task_id = f"history-{index}.{SINK}"
        done = {"state": ExportState.succeeded.value, "completed_at": long_ago, "lease_number": 1}
        rows[exports.EXPORT_TASKS].append({**task(task_id, long_ago), **done, "completion_published": True})
        lease = {"task_id": task_id, "owner": "old", "acquired_at": long_ago, "expires_at": long_ago}
        rows[EXPORT_LEASES].append({"_id": lease_id(task_id, 0), **lease})
        rows[jobs.FINISHES].append(
            {"_id": f"history-{index}", "claimed_at": long_ago, "published_at": long_ago}
        )
    for name, documents in rows.items():
        collection = database.collection(name)
        for start in range(0, len(documents), BATCH):
            await collection.insert_many(documents[start : start + BATCH], ordered=False)
    tasks = ExportTasks(database)
    for index in range(open_tasks):  # work in progress: held under live leases, on the watch list
        created = task(f"open-{index}.{SINK}", datetime.now(UTC))
        await tasks.create(task_for_document(created))
        assert await tasks.claim_task(created["_id"], "busy-exporter", 3600) is not None


def task_for_document(document: dict[str, Any]) -> ExportTask:
    """The domain task of a task document."""
    return ExportTask.model_validate({**document, "export_task_id": document["_id"]})


async def timed(work: Callable[[], Awaitable[object]]) -> float:
    started = time.perf_counter()
    await work()
    return (time.perf_counter() - started) * 1000


async def one_round(database: Database) -> dict[str, float]:
    """The sweep, a claim of a new task, and the finish sweep (with one stale claim), in ms."""
    tasks, job_store = ExportTasks(database), JobStore(database)
    new = task_for_document(task(f"new-{uuid.uuid4().hex}.{SINK}", datetime.now(UTC)))
    await tasks.create(new)
    stale_job = f"stale-{uuid.uuid4().hex}"
    await job_store.claim_finish(stale_job)
    await database.collection(jobs.FINISHES).update_one(
        {"_id": stale_job}, {"$set": {"claimed_at": datetime.now(UTC) - 2 * FINISH_LEASE}}
    )
    times = {"sweep": await timed(tasks.expire)}
    claimed: list[object] = []
    times["claim"] = await timed(lambda: _claim(tasks, claimed))
    found: list[str] = []
    times["finish sweep"] = await timed(lambda: _stale(job_store, found))
    assert claimed == [new.export_task_id], f"claimed {claimed}: the new task was the only claimable one"
    assert stale_job in found, "the unpublished claim is found stale"
    await tasks.record_result(new.export_task_id, "succeeded", [])
    await job_store.mark_finish_published(stale_job)
    return times


async def _claim(tasks: ExportTasks, claimed: list[object]) -> None:
    held = await tasks.claim(SINK, "bench-client", 60)
    claimed.append(None if held is None else held.export_task_id)


async def _stale(job_store: JobStore, found: list[str]) -> None:
    found.extend(await job_store.stale_finishes(FINISH_LEASE))


async def old_queries_ms(database: Database) -> tuple[float, float]:
    """What the sweeps queried before issue #18 (scans on this server)."""
    now = datetime.now(UTC)
    expired = database.collection(exports.EXPORT_TASKS).find(
        {"state": ExportState.in_progress.value, "lease_expires_at": {"$lt": now}}
    )
    stale = database.collection(jobs.FINISHES).find({"published_at": None, "claimed_at": {"$lte": now}})
    return await _or_timeout(lambda: expired.to_list(None)), await _or_timeout(lambda: stale.to_list(100))


async def _or_timeout(work: Callable[[], Awaitable[object]]) -> float:
    """ms, or infinity when the query outlasted the client's socket timeout (a loaded machine)."""
    try:
        return await timed(work)
    except PyMongoError:
        return float("inf")


async def measure(empty: Database, full: Database, rounds: int) -> dict[str, list[float]]:
    """Every round on both databases, alternating which goes first."""
    databases = {"empty": empty, "full": full}
    times: dict[str, list[float]] = {}
    for database in databases.values():  # warm-up, not counted
        await one_round(database)
    for round_number in range(rounds):
        order = list(databases.items()) if round_number % 2 == 0 else list(reversed(databases.items()))
        for name, database in order:
            for kind, elapsed in (await one_round(database)).items():
                times.setdefault(f"{kind} {name}", []).append(elapsed)
    return times


async def run(arguments: argparse.Namespace) -> tuple[dict[str, list[float]], dict[str, tuple[float, float]]]:
    async with empty_and_full((*exports.INDEXES, *jobs.INDEXES)) as (empty, full):
        started = time.perf_counter()
        await seed(empty, 0, arguments.open)
        await seed(full, arguments.history, arguments.open)
        print(f"seeded the history in {time.perf_counter() - started:.1f} s", file=sys.stderr)
        times = await measure(empty, full, arguments.rounds)
        old = {"empty": await old_queries_ms(empty), "full": await old_queries_ms(full)}
    return times, old


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--history", type=int, default=20_000)
    parser.add_argument("--open", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=20)
    arguments = parser.parse_args()
    configure_logging("console", "WARNING")
    times, old = asyncio.run(run(arguments))
    median = {name: statistics.median(values) for name, values in times.items()}
    kinds = ("sweep", "claim", "finish sweep")
    for name in ("empty", "full"):
        print(
            f"{name}: "
            + ", ".join(f"{kind} {median[f'{kind} {name}']:.1f} ms" for kind in kinds)
            + f"; before #18 the export sweep's query took {old[name][0]:.1f} ms and the finish sweep's "
            f"{old[name][1]:.1f} ms",
            file=sys.stderr,
        )
    full = ", ".join(f"{kind} {median[f'{kind} full']:.1f} ms" for kind in kinds)
    empty = ", ".join(f"{kind} {median[f'{kind} empty']:.1f} ms" for kind in kinds)
    ratios = " / ".join(f"{median[f'{kind} full'] / median[f'{kind} empty']:.2f}" for kind in kinds)
    print(
        f"| recovery vs history ({arguments.history} finished export tasks and job finishes) "
        f"| {full} | empty database: {empty} | ratio {ratios} | target ~1.0 (within noise) |"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
