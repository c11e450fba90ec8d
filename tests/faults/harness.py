"""Machinery of the fault-injection suite: consumer processes to kill, a tap that survives a broker
restart, and the final accounting of every study sent (jobs, exports, files at the DICOM sink).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import subprocess
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aio_pika
import pydicom
from aio_pika.abc import AbstractIncomingMessage

from devkit.pipeline import consumer_command
from devkit.services import REPO
from schemas.events import EVENTS_BY_TYPE_NAME, Event, ExportCompleted, JobFinished
from wm.adapters.mongo import Database
from wm.adapters.rabbitmq import dead_letter_queue_name, queue_name
from wm.config import Settings
from wm.stores.buckets import BUCKETS
from wm.stores.exports import EXPORT_TASKS
from wm.stores.jobs import FINISHES, JOBS

CONSUMERS = ("discovery", "scheduler", "monitor", "exporter")
E = TypeVar("E", bound=Event)


@dataclass
class Fleet:
    """One process per consumer (``mwm consume NAME``), each logging to its own file; kill -9 and restart.

    Like a Deployment's restart policy, `supervise` starts again a consumer that exited by itself (for
    example one that could not reach a service at start-up) and records that in ``crashes``.
    """

    env: Mapping[str, str]
    logs: Path
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    starts: Counter[str] = field(default_factory=Counter)
    crashes: list[str] = field(default_factory=list)

    def start(self, name: str) -> None:
        """Start (another incarnation of) consumer ``name``; its log is ``<logs>/<name>.<n>.log``."""
        self.logs.mkdir(parents=True, exist_ok=True)
        with self._log(name, self.starts[name]).open("wb") as log:
            self.processes[name] = subprocess.Popen(
                consumer_command(name),
                env={**self.env, "PYTHONUNBUFFERED": "1"},  # a SIGKILL must not eat the last log lines
                cwd=REPO,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.starts[name] += 1

    def _log(self, name: str, incarnation: int) -> Path:
        return self.logs / f"{name}.{incarnation}.log"

    def kill(self, name: str) -> None:
        """SIGKILL the consumer (no drain, no ack of what it holds); `start` brings it back."""
        process = self.processes.pop(name)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)

    async def supervise(self, stop: asyncio.Event, backoff_s: float = 1.0) -> None:
        """Restart consumers that exited by themselves until ``stop`` is set."""
        while not stop.is_set():
            for name, process in list(self.processes.items()):
                if process.poll() is not None:
                    log = self._log(name, self.starts[name] - 1)
                    last = log.read_text(errors="replace").strip().splitlines()[-1:] or ["-"]
                    self.crashes.append(f"{name} exited {process.returncode} ({log.name}: {last[0][:200]})")
                    del self.processes[name]
                    await asyncio.sleep(backoff_s)
                    self.start(name)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.2)

    def stop(self) -> None:
        """SIGKILL every consumer still running."""
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGKILL)
                process.wait(timeout=10)

    def log_lines(self, *needles: str) -> list[str]:
        """Log lines (of every incarnation) containing any of ``needles``."""
        return [
            f"{path.name}: {line}"
            for path in sorted(self.logs.glob("*.log"))
            for line in path.read_text(errors="replace").splitlines()
            if any(needle in line for needle in needles)
        ]


@dataclass
class Tapped:
    """One event seen on the bus, with its AMQP message id."""

    event: Event
    message_id: str


@dataclass
class DurableTap:
    """Events on a durable quorum queue read over a robust connection: nothing is missed across a broker
    restart (a redelivery may show an event twice; compare message ids)."""

    seen: list[Tapped] = field(default_factory=list)

    def of(self, kind: type[E]) -> list[E]:
        return [t.event for t in self.seen if isinstance(t.event, kind)]

    def message_ids(self, kind: type[Event]) -> list[str]:
        return [t.message_id for t in self.seen if isinstance(t.event, kind)]

    async def next(self, kind: type[Event], timeout: float) -> bool:
        """Wait for the next ``kind`` event from now on; False when none came within ``timeout``."""
        before = len(self.of(kind))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while len(self.of(kind)) == before:
            if loop.time() > deadline:
                return False
            await asyncio.sleep(0.01)
        return True


@asynccontextmanager
async def durable_tap(settings: Settings, routing_keys: Sequence[str]) -> AsyncIterator[DurableTap]:
    """A tap on ``<prefix>.faults-tap`` (removed with the test's other queues)."""
    tap = DurableTap()
    connection = await aio_pika.connect_robust(settings.bus.url, reconnect_interval=0.5)
    async with connection:
        channel = await connection.channel()
        exchange = await channel.declare_exchange(
            settings.bus.exchange, aio_pika.ExchangeType.TOPIC, durable=True
        )
        queue = await channel.declare_queue(
            queue_name(settings.bus, "faults-tap"), durable=True, arguments={"x-queue-type": "quorum"}
        )
        for key in routing_keys:
            await queue.bind(exchange, key)

        async def collect(message: AbstractIncomingMessage) -> None:
            async with message.process():
                kind = EVENTS_BY_TYPE_NAME[message.type or ""]
                tap.seen.append(
                    Tapped(kind.model_validate(json.loads(message.body)), str(message.message_id))
                )

        await queue.consume(collect)
        yield tap


async def queue_depths(settings: Settings) -> dict[str, int]:
    """Ready messages in every consumer queue and dead-letter queue."""
    depths: dict[str, int] = {}
    connection = await aio_pika.connect(settings.bus.url)
    async with connection:
        for consumer in CONSUMERS:
            for name in (queue_name(settings.bus, consumer), dead_letter_queue_name(settings.bus, consumer)):
                channel = await connection.channel()
                declared = await channel.declare_queue(name, passive=True)
                depths[name] = declared.declaration_result.message_count or 0
    return depths


@dataclass(frozen=True)
class AtSink:
    """What reached the DICOM sink: distinct instances per study, and how many arrived again.

    Export to a DICOM peer is at least once per file: an exporter killed after a C-STORE succeeded but
    before it recorded the result sends that file again when the task is retried. A receiver keeps
    instances by SOP Instance UID, so the second copy is the same instance: counted in ``resent``, not
    as a duplicated study. A duplicated study is one with more distinct instances than its one job made.
    """

    instances: Counter[str]
    resent: int


def received_at_sink(files: Sequence[Path]) -> AtSink:
    """Distinct SOP instances per StudyInstanceUID at the sink, and the count of repeated deliveries."""
    seen: set[tuple[str, str]] = set()
    instances: Counter[str] = Counter()
    for path in files:
        header = pydicom.dcmread(path, stop_before_pixels=True)
        key = (str(header.StudyInstanceUID), str(header.SOPInstanceUID))
        if key not in seen:
            seen.add(key)
            instances[key[0]] += 1
    return AtSink(instances, len(files) - len(seen))


@dataclass
class Snapshot:
    """What MWM recorded: jobs, job finishes, export tasks, and the study of every bucket."""

    jobs: list[dict[str, Any]]
    finishes: dict[str, dict[str, Any]]
    exports: list[dict[str, Any]]
    study_of_bucket: dict[str, str]

    def jobs_of_study(self) -> dict[str, list[dict[str, Any]]]:
        jobs: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for job in self.jobs:
            jobs[self.study_of_bucket.get(job["bucket_id"], "?")].append(job)
        return jobs


async def snapshot(settings: Settings) -> Snapshot:
    """Read the test database's jobs, finishes, export tasks and buckets."""
    async with Database(settings.mongo) as database:
        jobs = await database.collection(JOBS).find({}).to_list(None)
        finishes = await database.collection(FINISHES).find({}).to_list(None)
        exports = await database.collection(EXPORT_TASKS).find({}).to_list(None)
        buckets = await database.collection(BUCKETS).find({}, {"grouping_value": 1}).to_list(None)
    return Snapshot(
        jobs,
        {str(f["_id"]): f for f in finishes},
        exports,
        {str(b["_id"]): str(b["grouping_value"]) for b in buckets},
    )


OUTPUTS_PER_JOB = 1  # the example application writes one MIP per series; the studies have one
FINAL_JOB = ("succeeded", "failed", "cancelled", "timed_out")
FINAL_EXPORT = ("succeeded", "partial", "failed")


@dataclass
class Accounting:
    """Every study sent, counted; ``problems`` names each study that is lost or duplicated, and why."""

    row: dict[str, int]
    problems: list[str]
    failures: list[str]

    def table(self) -> str:
        header = " | ".join(self.row)
        values = " | ".join(str(v).rjust(len(k)) for k, v in self.row.items())
        return f"| {header} |\n|{'|'.join('-' * (len(k) + 2) for k in self.row)}|\n| {values} |"


@dataclass(frozen=True)
class Seen:
    """What the bus and the sink showed: job.finished / export.completed per job, files per study."""

    finished: Counter[str]
    completed: Counter[str]
    at_sink: Counter[str]
    outputs_per_job: int


def account(studies: Sequence[str], state: Snapshot, tap: DurableTap, at_sink: AtSink) -> Accounting:
    """Exactly one job and one export per study, or an explicit failure; nothing lost, nothing twice."""
    seen = Seen(
        Counter(e.job_id for e in tap.of(JobFinished)),
        Counter(e.job_id for e in tap.of(ExportCompleted)),
        at_sink.instances,
        OUTPUTS_PER_JOB,
    )
    jobs_of = state.jobs_of_study()
    exports_of = {task["job_id"]: task for task in state.exports}
    problems: list[str] = []
    verdicts: Counter[str] = Counter()
    for study in studies:
        found = _study_problems(study, jobs_of.get(study, []), exports_of, seen)
        verdicts.update({kind for kind, _ in found})
        problems += [f"{kind}: study {study}: {text}" for kind, text in found]
    jobs = [j for study in studies for j in jobs_of.get(study, [])]
    return Accounting(
        {
            "studies sent": len(studies),
            "jobs": len(jobs),
            "succeeded": sum(j["state"] == "succeeded" for j in jobs),
            "failed": sum(j["state"] in FINAL_JOB[1:] for j in jobs),
            "exports": sum(t["state"] == "succeeded" for t in state.exports),
            "exports failed": sum(t["state"] in FINAL_EXPORT[1:] for t in state.exports),
            "instances at sink": sum(at_sink.instances.values()),
            "re-sent": at_sink.resent,
            "duplicates": verdicts["duplicated"],
            "lost": verdicts["lost"],
        },
        problems,
        [_failure(job) for job in jobs if job["state"] != "succeeded"]
        + [_failure(task) for task in state.exports if task["state"] != "succeeded"],
    )


def _failure(document: dict[str, Any]) -> str:
    return f"{document['_id']} {document['state']}: {str(document.get('message'))[:300]}"


def _study_problems(
    study: str, jobs: list[dict[str, Any]], exports_of: Mapping[str, dict[str, Any]], seen: Seen
) -> list[tuple[str, str]]:
    problems: list[tuple[str, str]] = []
    if len(jobs) != 1:
        kind = "lost" if not jobs else "duplicated"
        problems.append((kind, f"{len(jobs)} jobs (buckets {[j['bucket_id'] for j in jobs]})"))
    expected_files = 0
    for job in jobs:
        task = exports_of.get(job["_id"])
        problems += [("lost", f"job {job['_id']}: {text}") for text in _job_problems(job, task, seen)]
        if job["state"] == "succeeded" and task is not None and task["state"] == "succeeded":
            expected_files += seen.outputs_per_job
    received = seen.at_sink[study]
    if received != expected_files:
        kind = "duplicated" if received > expected_files else "lost"
        problems.append((kind, f"{received} instances at the sink, expected {expected_files}"))
    return problems


def _job_problems(job: dict[str, Any], task: dict[str, Any] | None, seen: Seen) -> list[str]:
    job_id = job["_id"]
    problems = []
    if job["state"] not in FINAL_JOB:
        problems.append(f"still {job['state']}")
    if seen.finished[job_id] == 0:
        problems.append("no job.finished event")
    if job["state"] == "succeeded":
        if task is None:
            problems.append("succeeded, but no export task")
        elif task["state"] not in FINAL_EXPORT:
            problems.append(f"export task still {task['state']}")
        elif seen.completed[job_id] == 0:
            problems.append("no export.completed event")
    return problems
