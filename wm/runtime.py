"""The one consume loop: decode, bind log context, call the handler, then ack, retry or dead-letter.

For each delivery:

1. Decode: the ``type`` property names the event (``mwm.payload.arrived.v1``), the body must validate
   against its model, and ``message_id`` must be present. Otherwise: dead-letter at once with the reason.
2. A redelivery whose ``message_id`` this consumer already handled is acknowledged as a duplicate.
3. Call the handler. ``TransientError``: retry with exponential backoff, ``retry.attempts`` times in all,
   then dead-letter (after the consumer's ``on_give_up`` hook published any terminal failure event).
   ``PermanentError``: dead-letter at once. ``Duplicate``: acknowledge. Anything else is a bug:
   dead-letter and log the traceback.
4. Record the message id as handled (group-committed with concurrent deliveries), then acknowledge.
   A crash anywhere before the ack means the broker redelivers; handlers are idempotent, so the effect
   still happens once.

A process runs one or more consumers on one connection. SIGTERM (or SIGINT) stops taking deliveries,
waits up to ``observability.drain_timeout_s`` for those in flight, and exits. The broker connection is
robust: after a broker restart, channels, queues and consumers come back by themselves.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, NamedTuple, TypeVar

import structlog
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustChannel, AbstractRobustQueue
from pydantic import BaseModel
from starlette.applications import Starlette

from schemas.events import Event
from wm import metrics
from wm.adapters.mongo import PROCESSED_MESSAGES_INDEXES, Database, IndexSpec, ProcessedMessages
from wm.adapters.objectstore import ObjectStore
from wm.adapters.rabbitmq import Bus
from wm.config import BusSettings, Settings
from wm.delivery import decode, event_context
from wm.errors import Duplicate, InvalidMessage, PermanentError, TransientError
from wm.observability import Check, listen_observability, observability_app, serve, stop_on_signals
from wm.retry import backoff_delays, retrying

log = structlog.get_logger("wm.runtime")


Deps = TypeVar("Deps")
T = TypeVar("T")
Handler = Callable[[Any, Deps], Awaitable[None]]
GiveUpHook = Callable[[Any, Deps, str], Awaitable[None]]
BackgroundTask = Callable[[Deps, asyncio.Event], Coroutine[Any, Any, None]]


@dataclass
class Services:
    """The connections a process shares between its consumers."""

    settings: Settings
    bus: Bus
    database: Database
    objects: ObjectStore
    processed: ProcessedMessages


@dataclass(frozen=True)
class QueueSource:
    """A queue on another broker than MWM's own bus (a MONAI Informatics Gateway's), with its own wire format.

    ``bus`` gives the broker, exchange and dead-letter exchange the queue is declared on; ``decode`` turns a
    delivery into the model a handler takes (raising ``InvalidMessage``).
    """

    bus: Callable[[Settings], BusSettings]
    routing_keys: Callable[[Settings], tuple[str, ...]]
    decode: Callable[[AbstractIncomingMessage], BaseModel]


@dataclass(frozen=True)
class Consumer(Generic[Deps]):
    """A consumer: its queue's bindings, a handler per event type, and how it builds its ports.

    ``routing_keys``: by default the event type of each handler's event (MWM's own events); a consumer of
    other keys (a sink type's ``export.requested``) names them. ``background`` coroutines run beside the
    queue until the stop event is set (for example a sweeper). ``source`` puts the queue on another broker
    (None: MWM's own bus and events). ``enabled_when``: a process running every consumer (``mwm consume
    all``) runs this one only when it says so.
    """

    name: str
    handlers: Mapping[type[BaseModel], Handler[Deps]]
    build_deps: Callable[[Services], Deps]
    routing_keys: tuple[str, ...] = ()
    indexes: tuple[IndexSpec, ...] = ()
    on_give_up: GiveUpHook[Deps] | None = None
    background: tuple[BackgroundTask[Deps], ...] = ()
    prefetch: int | None = None
    source: QueueSource | None = None
    enabled_when: Callable[[Settings], bool] | None = None

    def __post_init__(self) -> None:
        if not self.routing_keys:  # frozen: set once, here, as the dataclass documentation does
            keys = tuple(model.event_type for model in self.handlers if issubclass(model, Event))
            object.__setattr__(self, "routing_keys", keys)

    def bus_settings(self, settings: Settings) -> BusSettings:
        """Where this consumer's queue lives."""
        return settings.bus if self.source is None else self.source.bus(settings)

    def bindings(self, settings: Settings) -> tuple[str, ...]:
        """The routing keys its queue is bound to."""
        return self.routing_keys if self.source is None else self.source.routing_keys(settings)

    def enabled(self, settings: Settings) -> bool:
        """Whether a process running every consumer runs this one."""
        return self.enabled_when is None or self.enabled_when(settings)


@contextlib.asynccontextmanager
async def open_services(settings: Settings, indexes: tuple[IndexSpec, ...] = ()) -> AsyncIterator[Services]:
    """Connect to the broker, the database and the object store; close them all on exit.

    A service that is down or slow at start-up (a restart, a pod scheduled first) is retried with the
    configured backoff before the process gives up, rather than crashing at once.
    """
    async with contextlib.AsyncExitStack() as opened:

        async def connect(service: Callable[[], contextlib.AbstractAsyncContextManager[T]], what: str) -> T:
            # A fresh adapter per attempt: a failed __aenter__ has closed the one before (its pools too).
            return await retrying(
                lambda: opened.enter_async_context(service()), settings.retry, f"connect to {what}"
            )

        bus = await connect(lambda: Bus(settings.bus), "RabbitMQ")
        database = await connect(
            lambda: Database(settings.mongo, (PROCESSED_MESSAGES_INDEXES, *indexes)), "the database"
        )
        objects = await connect(lambda: ObjectStore(settings.object_store), "the object store")
        processed = ProcessedMessages(database)
        opened.push_async_callback(processed.flush)  # before the database closes
        yield Services(settings, bus, database, objects, processed)


class _Outcome(NamedTuple):
    kind: str  # "succeeded" | "duplicate" | "dead_lettered"
    reason: str = ""
    cause: str = ""


_SUCCEEDED = _Outcome("succeeded")
_DUPLICATE = _Outcome("duplicate")


@dataclass
class ConsumerRunner(Generic[Deps]):
    """Runs one consumer on its own channel of the shared connection."""

    consumer: Consumer[Deps]
    services: Services
    deps: Deps = field(init=False)
    _bus: Bus | None = field(default=None, init=False)
    _queue: AbstractRobustQueue | None = field(default=None, init=False)
    _channel: AbstractRobustChannel | None = field(default=None, init=False)
    _tag: str | None = field(default=None, init=False)
    _inflight: set[asyncio.Task[None]] = field(default_factory=set, init=False)
    _background: list[asyncio.Task[None]] = field(default_factory=list, init=False)
    _stopping: asyncio.Event = field(default_factory=asyncio.Event, init=False)

    def __post_init__(self) -> None:
        self.deps = self.consumer.build_deps(self.services)
        name = self.consumer.name
        self._consumed = metrics.CONSUMED.labels(name)
        self._succeeded = metrics.SUCCEEDED.labels(name)
        self._handler_seconds = metrics.HANDLER_SECONDS.labels(name)

    @property
    def settings(self) -> Settings:
        return self.services.settings

    async def start(self) -> None:
        """Declare the queue, start consuming and start the background tasks."""
        bus = self.services.bus
        if self.consumer.source is not None:  # a broker of its own, closed in stop()
            bus = await Bus(self.consumer.bus_settings(self.settings)).__aenter__()
        self._bus = bus
        self._channel = await bus.connection.channel()
        assert self._channel is not None
        await self._channel.set_qos(prefetch_count=self.consumer.prefetch or self.settings.bus.prefetch)
        self._queue = await bus.declare_consumer_queue(
            self._channel, self.consumer.name, self.consumer.bindings(self.settings)
        )
        self._tag = await self._queue.consume(self._on_message)
        for task in self.consumer.background:
            self._background.append(asyncio.create_task(task(self.deps, self._stopping)))
        log.info("consumer_started", consumer=self.consumer.name, queue=self._queue.name)

    async def stop(self, drain_timeout_s: float) -> None:
        """Stop taking deliveries; let in-flight ones and background tasks finish within the drain timeout."""
        self._stopping.set()
        if self._queue is not None and self._tag is not None:
            # Bounded: with the connection down (a broker restart during the SIGTERM), a robust channel
            # waits for a reconnection before it cancels; the broker drops the consumer with the connection.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._queue.cancel(self._tag), self.settings.bus.cancel_timeout_s)
        pending = set(self._inflight) | set(self._background)
        if pending:
            done, not_done = await asyncio.wait(pending, timeout=drain_timeout_s)
            for task in not_done:
                task.cancel()
            log.info(
                "consumer_drained", consumer=self.consumer.name, finished=len(done), abandoned=len(not_done)
            )
        if self._channel is not None and not self._channel.is_closed:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._channel.close(), self.settings.bus.cancel_timeout_s)
        if self._bus is not None and self._bus is not self.services.bus:
            await self._bus.close()

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        # A task of our own, not aio-pika's: closing the channel (a broker restart) cancels the tasks aiormq
        # runs deliveries in, and a handler must still finish its effects when only its ack is lost. Its
        # context is a copy, so what _process binds stays with this delivery.
        task = asyncio.create_task(self._process(message))
        self._inflight.add(task)
        task.add_done_callback(self._inflight.discard)

    async def _process(self, message: AbstractIncomingMessage) -> None:
        started = time.perf_counter()
        self._consumed.inc()
        context = {
            "consumer": self.consumer.name,
            "message_id": message.message_id,
            "correlation_id": message.correlation_id,
            "event_type": message.type,
            "delivery_count": (message.headers or {}).get("x-delivery-count", 0),
        }
        try:
            source = self.consumer.source
            event = decode(message, self.consumer.handlers) if source is None else source.decode(message)
        except InvalidMessage as exc:
            structlog.contextvars.bind_contextvars(**context)
            outcome = _Outcome("dead_lettered", str(exc), "invalid")
        else:
            structlog.contextvars.bind_contextvars(**context, **event_context(event))
            outcome = await self._outcome(event, message)
        await self._settle(message, outcome)
        elapsed = time.perf_counter() - started
        self._handler_seconds.observe(elapsed)
        log.info(
            "delivery_handled",
            outcome=outcome.kind,
            reason=outcome.reason or None,
            duration_ms=round(elapsed * 1000, 2),
        )

    async def _outcome(self, event: BaseModel, message: AbstractIncomingMessage) -> _Outcome:
        try:
            redelivered = bool(message.redelivered or (message.headers or {}).get("x-delivery-count"))
            return await self._handle_with_retries(event, str(message.message_id), redelivered)
        except PermanentError as exc:
            return _Outcome("dead_lettered", f"permanent: {exc}", "permanent")
        except Exception as exc:
            log.exception("handler_bug", error=repr(exc))
            metrics.FAILED.labels(self.consumer.name, type(exc).__name__).inc()
            return _Outcome("dead_lettered", f"unexpected {type(exc).__name__}: {exc}", "bug")

    async def _handle_with_retries(self, event: BaseModel, message_id: str, redelivered: bool) -> _Outcome:
        name = self.consumer.name
        delays: Iterator[float] | None = None  # made on the first failure: most deliveries never need one
        for attempt in itertools.count(1):
            try:
                # The look-up is a shortcut for redeliveries, kept off the hot path: a first delivery of a
                # re-published message (same message_id) reaches the handler, whose effects are idempotent.
                if redelivered and await self.services.processed.seen(name, message_id):
                    return _DUPLICATE
                try:
                    await self.consumer.handlers[type(event)](event, self.deps)
                    outcome = _SUCCEEDED
                except Duplicate:
                    outcome = _DUPLICATE
                await self.services.processed.record(name, message_id)
                return outcome
            except TransientError as exc:
                metrics.FAILED.labels(name, "transient").inc()
                delays = delays or backoff_delays(self.settings.retry)
                delay = next(delays, None)
                if delay is None:
                    reason = f"transient failure persisted after {attempt} attempts: {exc}"
                    await self._give_up(event, reason)
                    return _Outcome("dead_lettered", reason, "retries_exhausted")
                log.warning("handler_retrying", attempt=attempt, delay_s=delay, error=str(exc))
                await asyncio.sleep(delay)
        raise AssertionError("unreachable: itertools.count never ends")

    async def _give_up(self, event: BaseModel, reason: str) -> None:
        if self.consumer.on_give_up is None:
            return
        try:
            await self.consumer.on_give_up(event, self.deps, reason)
        except Exception as exc:  # the dead letter still records the failure
            log.error("give_up_hook_failed", error=repr(exc))

    async def _settle(self, message: AbstractIncomingMessage, outcome: _Outcome) -> None:
        name = self.consumer.name
        try:
            if outcome.kind == "dead_lettered":
                assert self._bus is not None
                await self._bus.dead_letter(message, name, outcome.reason)
                metrics.DEAD_LETTERED.labels(name, outcome.cause).inc()
                log.warning("dead_lettered", reason=outcome.reason)
            elif outcome.kind == "duplicate":
                metrics.DUPLICATES.labels(name).inc()
            else:
                self._succeeded.inc()
            await message.ack()
        except TransientError as exc:
            # The copy to the DLQ was not confirmed: leave the delivery to the broker, which redelivers it
            # and, past x-delivery-limit, dead-letters it itself.
            log.error("dead_letter_failed", error=str(exc))
            with contextlib.suppress(Exception):
                await message.nack(requeue=True)
        except Exception as exc:
            # The channel closed under us (broker restart): the broker redelivers; handlers are idempotent.
            log.warning("ack_lost", error=repr(exc))


def service_checks(services: Services) -> dict[str, Check]:
    """The readiness checks of a role that uses all three services."""

    async def bus() -> bool:
        return services.bus.is_connected

    return {"bus": bus, "database": services.database.ping, "object_store": services.objects.ping}


def health_app(services: Services) -> Starlette:
    """``/healthz`` (alive), ``/readyz`` (broker, database and object store reachable), ``/metrics``."""
    checks = service_checks(services)
    return observability_app(lambda: checks)


async def run_consumers(
    settings: Settings, consumers: list[Consumer[Any]], stop: asyncio.Event | None = None
) -> None:
    """Run consumers in this process until SIGTERM/SIGINT (or ``stop``), then drain and exit.

    The observability port answers from the start: ``/readyz`` says 503 while the services are being
    reached and again while draining, ``/healthz`` stays 200 until the process exits.
    """
    stop = stop or stop_on_signals()
    indexes = tuple(spec for consumer in consumers for spec in consumer.indexes)
    observability = settings.observability
    listener = listen_observability(observability)  # before connecting: a port in use fails at once
    checks: dict[str, Check] | None = None
    http_stop = asyncio.Event()
    http = (
        None
        if listener is None
        else asyncio.create_task(serve(observability_app(lambda: checks), listener, http_stop))
    )
    try:
        async with open_services(settings, indexes) as services:
            runners = [ConsumerRunner(consumer, services) for consumer in consumers]
            for runner in runners:
                await runner.start()
            # What start-up built (modules, schemas, clients) lives as long as the process: out of the
            # collector's way, a full collection walks only what deliveries allocate.
            gc.freeze()
            checks = service_checks(services)
            log.info("process_ready", consumers=[consumer.name for consumer in consumers])
            await stop.wait()
            checks = None
            log.info("draining", timeout_s=observability.drain_timeout_s)
            await asyncio.gather(*(runner.stop(observability.drain_timeout_s) for runner in runners))
    finally:
        http_stop.set()
        if http is not None:
            await http
    log.info("stopped")
