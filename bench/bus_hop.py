"""Bus hop: the cost of one MWM consumer hop against a bare aio-pika consume + ack, side by side.

Both sides drain N persistent ``PayloadArrived`` messages (identical bodies and properties) from a quorum
queue with the same arguments and the same prefetch, on the same broker, in the same process and run:

- ``mwm``: the real runtime (``wm.runtime.run_consumers``) with a consumer whose handler does nothing, so a
  delivery costs decode + validation, the idempotency check and record (``processed_messages`` on the
  MongoDB-wire server, written behind the ack), the log line and the ack;
- ``raw``: an aio-pika consumer that only calls ``message.ack()``.

Each round measures both sides, taking turns at going first. All messages are published (with confirms)
before the clock starts; the clock runs from the first delivery to the N-th (for ``mwm``: until the N-th
idempotency key is in the database). Prints one markdown row (``| bus hop ... |``) and a summary line on
stdout; each round's rates and the logs go to stderr.

    python bench/bus_hop.py [--messages 3000] [--rounds 7]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aio_pika
from aio_pika.abc import AbstractIncomingMessage
from pymongo.asynchronous.collection import AsyncCollection

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python bench/bus_hop.py` from anywhere
    sys.path.insert(0, str(REPO))

from devkit.events import payload_arrived  # noqa: E402
from devkit.services import cleanup, reachable, service_endpoints, unique_settings  # noqa: E402
from schemas.events import PayloadArrived  # noqa: E402
from wm.adapters.mongo import PROCESSED_MESSAGES, Database, Document  # noqa: E402
from wm.adapters.rabbitmq import Bus, event_message, queue_name  # noqa: E402
from wm.config import Settings  # noqa: E402
from wm.errors import TransientError  # noqa: E402
from wm.logging import configure_logging  # noqa: E402
from wm.runtime import Consumer, Services, run_consumers  # noqa: E402

CONSUMER = "bench-bus-hop"
RAW_QUEUE = "bench-raw"
TARGET_RATIO = 0.5
PUBLISH_BATCH = 200
DRAIN_TIMEOUT_S = 600.0
SERVICES_TIMEOUT_S = 180.0
ROUND_ATTEMPTS = 3


@dataclass
class Clock:
    """Counts distinct messages handled; remembers when the first and the N-th were."""

    expected: int
    first: float = 0.0
    last: float = 0.0
    handled: set[str] = field(default_factory=set)
    last_key: str = ""
    done: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def count(self) -> int:
        return len(self.handled)

    def started(self) -> None:
        if not self.first:
            self.first = time.perf_counter()

    def finished(self, key: str) -> None:
        """A retried delivery can reach the handler twice: count each message once."""
        self.handled.add(key)
        self.last_key = key
        if self.count == self.expected and not self.done.is_set():
            self.last = time.perf_counter()
            self.done.set()

    @property
    def rate(self) -> float:
        return self.expected / (self.last - self.first)


async def _in_batches(publishes: Iterable[Awaitable[object]]) -> None:
    """Await lazily created publishes, ``PUBLISH_BATCH`` at a time."""
    batch: list[Awaitable[object]] = []
    for publish in publishes:
        batch.append(publish)
        if len(batch) == PUBLISH_BATCH:
            await asyncio.gather(*batch)
            batch = []
    await asyncio.gather(*batch)


def _queue_arguments(settings: Settings, name: str) -> dict[str, Any]:
    """The arguments ``Bus.declare_consumer_queue`` gives a consumer queue."""
    return {
        "x-queue-type": "quorum",
        "x-delivery-limit": settings.bus.delivery_limit,
        "x-dead-letter-exchange": settings.bus.dead_letter_exchange,
        "x-dead-letter-routing-key": name,
    }


def _events(bodies: list[bytes]) -> Iterator[PayloadArrived]:
    # The events live only while published: a consumer process does not hold thousands of them, and their
    # objects would make every full garbage collection of the measured consumers slower.
    return (PayloadArrived.model_validate_json(body) for body in bodies)


async def measure_raw(settings: Settings, bodies: list[bytes]) -> float:
    """messages/s of a bare aio-pika consumer that only acks."""
    clock = Clock(len(bodies))
    connection = await aio_pika.connect(settings.bus.url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        await channel.declare_exchange(
            settings.bus.dead_letter_exchange, aio_pika.ExchangeType.DIRECT, durable=True
        )
        name = queue_name(settings.bus, RAW_QUEUE)
        await channel.declare_queue(name, durable=True, arguments=_queue_arguments(settings, name))
        exchange = channel.default_exchange
        await _in_batches(
            exchange.publish(event_message(event, app_id=settings.bus.app_id), routing_key=name)
            for event in _events(bodies)
        )

        async def on_message(message: AbstractIncomingMessage) -> None:
            clock.started()
            await message.ack()
            clock.finished(str(message.message_id))

        consumer_channel = await connection.channel()
        await consumer_channel.set_qos(prefetch_count=settings.bus.prefetch)
        queue = await consumer_channel.get_queue(name)
        tag = await queue.consume(on_message)
        await asyncio.wait_for(clock.done.wait(), DRAIN_TIMEOUT_S)
        await queue.cancel(tag)
    return clock.rate


async def measure_mwm(settings: Settings, bodies: list[bytes]) -> float:
    """messages/s of the MWM runtime with a no-op handler."""
    clock = Clock(len(bodies))

    async def noop(event: PayloadArrived, deps: None) -> None:
        clock.started()
        clock.finished(event.correlation_id)

    def no_deps(services: Services) -> None:
        return None

    consumer: Consumer[None] = Consumer(
        name=CONSUMER,
        routing_keys=(PayloadArrived.event_type,),
        handlers={PayloadArrived: noop},
        build_deps=no_deps,
    )
    async with Bus(settings.bus) as bus:
        await bus.declare_consumer_queue(bus.channel, CONSUMER, consumer.routing_keys)
        # The message id is the correlation id, so the clock knows the key of the last message handled.
        await _in_batches(bus.publish(event, message_id=event.correlation_id) for event in _events(bodies))

    stop = asyncio.Event()
    running = asyncio.create_task(run_consumers(settings, [consumer], stop=stop))
    try:
        done = asyncio.create_task(clock.done.wait())
        await asyncio.wait({done, running}, timeout=DRAIN_TIMEOUT_S, return_when=asyncio.FIRST_COMPLETED)
        if not clock.done.is_set():
            done.cancel()
            raise RuntimeError(f"mwm consumer handled {clock.count} of {clock.expected} messages")
        async with Database(settings.mongo) as database:
            keys = database.collection(PROCESSED_MESSAGES)
            await _wait_recorded(keys, f"{CONSUMER}:{clock.last_key}")
            clock.last = time.perf_counter()  # keys are written behind the acks: the hop ends when all landed
            recorded = await keys.count_documents({})
        if recorded != len(bodies):
            raise RuntimeError(f"{recorded} of {len(bodies)} idempotency keys were recorded")
    finally:
        stop.set()
        await running
    return clock.rate


async def _wait_recorded(keys: AsyncCollection[Document], last_key: str) -> None:
    """Wait until the last message's key is in the database.

    One flusher writes keys in the order they were recorded, so the last one lands last; it is looked up by
    ``_id`` because a count scans the collection on the MongoDB-wire server (100 ms for 3,000 keys) and
    would stretch the very interval it measures. The caller checks the count once the clock has stopped.
    """
    deadline = time.monotonic() + 30
    while await keys.find_one({"_id": last_key}, {"_id": 1}) is None:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the last idempotency key {last_key} was not recorded within 30 s")
        await asyncio.sleep(0.002)


def bench_settings(work_dir: Path) -> Settings:
    """This run's own exchange, queues and database, with the production timeouts and retry policy."""
    settings = unique_settings(work_dir, observability={"http_port": 0})
    defaults = Settings()
    return settings.model_copy(
        update={
            "mongo": settings.mongo.model_copy(update={"timeout_ms": defaults.mongo.timeout_ms}),
            "retry": defaults.retry,
        }
    )


async def wait_for_services(settings: Settings, timeout_s: float = SERVICES_TIMEOUT_S) -> None:
    """Wait until the broker, the database and the object store accept connections (they may restart)."""
    deadline = time.monotonic() + timeout_s
    for name, (host, port) in service_endpoints(settings).items():
        while not await asyncio.to_thread(reachable, host, port):
            if time.monotonic() > deadline:
                raise TransientError(f"{name} at {host}:{port} not reachable after {timeout_s:.0f} s")
            await asyncio.sleep(1.0)


async def one_round(messages: int, mwm_first: bool) -> tuple[float, float, Settings]:
    """(mwm msg/s, raw msg/s); a round a service restart broke is run again on fresh names."""
    for attempt in range(1, ROUND_ATTEMPTS + 1):
        try:
            return await _one_round(messages, mwm_first)
        except TransientError as exc:
            if attempt == ROUND_ATTEMPTS:
                raise
            print(f"bus hop: round failed ({exc}); running it again", file=sys.stderr)
    raise AssertionError("unreachable")


async def _one_round(messages: int, mwm_first: bool) -> tuple[float, float, Settings]:
    """(mwm msg/s, raw msg/s) on fresh queues and a fresh database."""
    with tempfile.TemporaryDirectory(prefix="mwm-bench-") as work_dir:
        settings = bench_settings(Path(work_dir))
        await wait_for_services(settings)
        bodies = [payload_arrived().model_dump_json().encode() for _ in range(messages)]
        try:
            if mwm_first:
                mwm = await measure_mwm(settings, bodies)
                raw = await measure_raw(settings, bodies)
            else:
                raw = await measure_raw(settings, bodies)
                mwm = await measure_mwm(settings, bodies)
        finally:
            try:
                await cleanup(settings)
            except Exception as exc:  # best effort: a service may be restarting; names are unique per run
                print(f"bus hop: clean-up incomplete: {exc!r}", file=sys.stderr)
    return mwm, raw, settings


async def main(messages: int, rounds: int) -> int:
    defaults = Settings()
    configure_logging(defaults.observability.log_format, defaults.observability.log_level)
    results = []
    for number in range(1, rounds + 1):
        # The side that goes second finds the broker still compacting the first side's queue: take turns.
        mwm_rate, raw_rate, settings = await one_round(messages, mwm_first=number % 2 == 0)
        print(
            f"bus hop: round {number}: mwm {mwm_rate:.0f} msg/s, raw {raw_rate:.0f} msg/s, "
            f"ratio {mwm_rate / raw_rate:.2f}",
            file=sys.stderr,
        )
        results.append((mwm_rate, raw_rate, settings))
    mwm = statistics.median(result[0] for result in results)
    raw = statistics.median(result[1] for result in results)
    settings = results[0][2]
    # Each round measures the two sides back to back: the ratio of a round is taken under one machine
    # condition, and their median does not pair one round's MWM with another round's baseline.
    ratio = statistics.median(result[0] / result[1] for result in results)
    print(
        f"| bus hop (consume, validate, idempotency key, ack) | mwm {mwm:.0f} msg/s "
        f"| raw aio-pika {raw:.0f} msg/s | ratio {ratio:.2f} | target >= {TARGET_RATIO} |"
    )
    verdict = "meets" if ratio >= TARGET_RATIO else "misses"
    print(
        f"bus hop: {messages} messages x {rounds} round(s) (medians; the ratio is the rounds' median), "
        f"prefetch {settings.bus.prefetch}, "
        f"log level {settings.observability.log_level}: MWM {mwm:.0f} msg/s vs raw aio-pika {raw:.0f} msg/s, "
        f"ratio {ratio:.2f} ({verdict} the >= {TARGET_RATIO} target)"
    )
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=3000, help="messages per side (default 3000)")
    parser.add_argument("--rounds", type=int, default=7, help="paired rounds (sides take turns going first)")
    arguments = parser.parse_args()
    sys.exit(asyncio.run(main(arguments.messages, arguments.rounds)))
