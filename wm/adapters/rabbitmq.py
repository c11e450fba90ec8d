"""RabbitMQ through aio-pika: topology, a confirming publisher, dead-lettering with a reason.

Topology (declared idempotently by every process that uses it, and by ``mwm topology declare``):

- ``<exchange>``: durable topic exchange every event is published to (routing key = event type).
- ``<dead_letter_exchange>``: durable direct exchange for dead letters.
- ``<prefix>.<consumer>``: one durable quorum queue per consumer, bound to its routing keys, with
  ``x-delivery-limit`` and dead-lettering to ``<dead_letter_exchange>`` under the queue's own name, so a
  dead letter lands only in its own consumer's dead-letter queue.
- ``<prefix>.<consumer>.dead-letter``: the dead-letter queue of that consumer.

A message dead-lettered by MWM carries the headers ``x-mwm-reason``, ``x-mwm-queue``,
``x-mwm-routing-key`` and ``x-mwm-dead-lettered-at``; one dead-lettered by RabbitMQ itself (delivery limit)
carries RabbitMQ's ``x-death`` header instead.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any, Self

import aio_pika
import aiormq
from aio_pika.abc import (
    AbstractIncomingMessage,
    AbstractRobustChannel,
    AbstractRobustConnection,
    AbstractRobustExchange,
    AbstractRobustQueue,
)

from schemas.events import Event
from wm import metrics
from wm.adapters.closing import ClosedOnExit
from wm.config import BusSettings
from wm.errors import TransientError

REASON_HEADER = "x-mwm-reason"
QUEUE_HEADER = "x-mwm-queue"
ROUTING_KEY_HEADER = "x-mwm-routing-key"
DEAD_LETTERED_AT_HEADER = "x-mwm-dead-lettered-at"

_BROKER_ERRORS: tuple[type[BaseException], ...] = (
    aiormq.exceptions.AMQPError,
    aio_pika.exceptions.AMQPException,
    ConnectionError,
    asyncio.TimeoutError,
    RuntimeError,  # aio-pika raises it for a channel that is closed while reconnecting
)


def _count_reconnect(connection: object) -> None:
    metrics.BUS_RECONNECTS.inc()


def queue_name(settings: BusSettings, consumer: str) -> str:
    """The queue a consumer reads."""
    return f"{settings.queue_prefix}.{consumer}"


def dead_letter_queue_name(settings: BusSettings, consumer: str) -> str:
    """The dead-letter queue of a consumer's queue."""
    return f"{queue_name(settings, consumer)}.dead-letter"


def event_message(event: Event, *, app_id: str, message_id: str | None = None) -> aio_pika.Message:
    """The AMQP message for an event, with every property of the bus contract."""
    return aio_pika.Message(
        body=event.model_dump_json().encode(),
        content_type="application/json",
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        message_id=message_id or str(uuid.uuid4()),
        correlation_id=event.correlation_id,
        type=event.type_name(),
        timestamp=datetime.now(UTC),
        app_id=app_id,
    )


class Bus(ClosedOnExit):
    """A robust connection to the broker, with a publisher-confirms channel.

    Use as an async context manager. Every method raises ``TransientError`` when the broker cannot be
    reached or does not confirm in time; callers (the runtime) retry.
    """

    def __init__(self, settings: BusSettings) -> None:
        self.settings = settings
        self._connection: AbstractRobustConnection | None = None
        self._channel: AbstractRobustChannel | None = None
        self._exchange: AbstractRobustExchange | None = None
        self._dead_letter_exchange: AbstractRobustExchange | None = None

    async def __aenter__(self) -> Self:
        try:
            self._connection = await aio_pika.connect_robust(
                self.settings.url, reconnect_interval=self.settings.reconnect_interval_s
            )
            self._connection.reconnect_callbacks.add(_count_reconnect)
            metrics.BUS_CONNECTED.set_function(lambda: float(self.is_connected))
            self._channel = await self._connection.channel(publisher_confirms=True)
            self._exchange, self._dead_letter_exchange = await self._declare_exchanges(self.channel)
        except _BROKER_ERRORS as exc:
            await self.close()
            raise TransientError(f"cannot connect to RabbitMQ at {self.settings.url}: {exc}") from exc
        return self

    async def close(self) -> None:
        """Close the connection (idempotent)."""
        if self._connection is not None and not self._connection.is_closed:
            await self._connection.close()
        self._connection = None

    @property
    def connection(self) -> AbstractRobustConnection:
        assert self._connection is not None, "Bus used outside its context"
        return self._connection

    @property
    def channel(self) -> AbstractRobustChannel:
        assert self._channel is not None, "Bus used outside its context"
        return self._channel

    @property
    def is_connected(self) -> bool:
        """True while the connection to the broker is open."""
        return (
            self._connection is not None
            and not self._connection.is_closed
            and self._connection.connected.is_set()
        )

    async def _declare_exchanges(
        self, channel: AbstractRobustChannel
    ) -> tuple[AbstractRobustExchange, AbstractRobustExchange]:
        exchange = await channel.declare_exchange(
            self.settings.exchange, aio_pika.ExchangeType.TOPIC, durable=True
        )
        dead_letters = await channel.declare_exchange(
            self.settings.dead_letter_exchange, aio_pika.ExchangeType.DIRECT, durable=True
        )
        return exchange, dead_letters

    async def declare_consumer_queue(
        self, channel: AbstractRobustChannel, consumer: str, routing_keys: Iterable[str]
    ) -> AbstractRobustQueue:
        """Declare a consumer's quorum queue, its dead-letter queue and their bindings on ``channel``."""
        exchange, dead_letters = await self._declare_exchanges(channel)
        name = queue_name(self.settings, consumer)
        dead_letter_queue = await channel.declare_queue(
            dead_letter_queue_name(self.settings, consumer),
            durable=True,
            arguments={"x-queue-type": "quorum"},
        )
        await dead_letter_queue.bind(dead_letters, routing_key=name)
        queue = await channel.declare_queue(
            name,
            durable=True,
            arguments={
                "x-queue-type": "quorum",
                "x-delivery-limit": self.settings.delivery_limit,
                "x-dead-letter-exchange": self.settings.dead_letter_exchange,
                "x-dead-letter-routing-key": name,
            },
        )
        for routing_key in routing_keys:
            await queue.bind(exchange, routing_key=routing_key)
        return queue

    async def publish(self, event: Event, *, message_id: str | None = None) -> str:
        """Publish an event persistently and wait for the broker's confirm. Returns the message id.

        Give ``message_id`` when the event is derived from a business key (a bucket id, a job id), so a
        re-publish after a crash carries the same id and downstream duplicates are recognised.
        """
        message = event_message(event, app_id=self.settings.app_id, message_id=message_id)
        await self._publish(self._exchange, message, event.routing_key(), mandatory=event.must_route())
        return str(message.message_id)

    async def publish_message(self, message: aio_pika.Message, routing_key: str) -> None:
        """Publish a prepared message to the event exchange (used to replay dead letters)."""
        await self._publish(self._exchange, message, routing_key)

    async def send_to_queue(self, message: aio_pika.Message, queue: str) -> None:
        """Publish straight to one queue: a replayed dead letter reaches only its own consumer."""
        await self._publish(self.channel.default_exchange, message, queue)  # type: ignore[arg-type]

    async def dead_letter(self, incoming: AbstractIncomingMessage, consumer: str, reason: str) -> None:
        """Copy a delivery to its consumer's dead-letter queue with the reason in a header.

        The caller acknowledges the original only after this returns (the broker confirmed the copy).
        """
        headers: dict[str, Any] = dict(incoming.headers or {})
        headers.update(
            {
                REASON_HEADER: reason[:4000],
                QUEUE_HEADER: queue_name(self.settings, consumer),
                ROUTING_KEY_HEADER: incoming.routing_key or "",
                DEAD_LETTERED_AT_HEADER: datetime.now(UTC).isoformat(),
            }
        )
        message = persistent_copy(incoming, headers)
        await self._publish(self._dead_letter_exchange, message, queue_name(self.settings, consumer))

    async def _publish(
        self,
        exchange: AbstractRobustExchange | None,
        message: aio_pika.Message,
        key: str,
        mandatory: bool = True,
    ) -> None:
        assert exchange is not None, "Bus used outside its context"
        try:
            confirmation = await exchange.publish(
                message, routing_key=key, mandatory=mandatory, timeout=self.settings.publish_timeout_s
            )
        except _BROKER_ERRORS as exc:
            raise TransientError(f"publish to {key!r} failed: {exc!r}") from exc
        if isinstance(confirmation, aiormq.abc.DeliveredMessage):
            raise TransientError(f"no queue is bound to {key!r} (run `mwm topology declare`): not routed")
        if not isinstance(confirmation, aiormq.spec.Basic.Ack):
            raise TransientError(f"broker did not confirm the publish to {key!r}: {confirmation!r}")


def persistent_copy(incoming: AbstractIncomingMessage, headers: Mapping[str, Any]) -> aio_pika.Message:
    """A persistent message with ``incoming``'s body and properties but ``headers`` instead of its own.

    Dead-lettering and replaying both republish a delivery as it came, ids and timestamp included, so a
    consumer's idempotency sees the copy as the same message.
    """
    return aio_pika.Message(
        body=incoming.body,
        headers=dict(headers),
        content_type=incoming.content_type,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        message_id=incoming.message_id,
        correlation_id=incoming.correlation_id,
        type=incoming.type,
        timestamp=incoming.timestamp,
        app_id=incoming.app_id,
    )


def describe_dead_letter(message: AbstractIncomingMessage) -> Mapping[str, Any]:
    """The facts an operator needs about a dead letter: why, from where, when."""
    headers = dict(message.headers or {})
    deaths = headers.get("x-death") or []
    first_death: Mapping[str, Any] = {}
    if isinstance(deaths, list) and deaths and isinstance(deaths[0], dict):
        first_death = deaths[0]
    reason = headers.get(REASON_HEADER) or (
        f"rabbitmq: {first_death.get('reason')}" if first_death else "unknown"
    )
    return {
        "message_id": message.message_id,
        "correlation_id": message.correlation_id,
        "type": message.type,
        "reason": reason,
        "queue": headers.get(QUEUE_HEADER) or first_death.get("queue"),
        "routing_key": headers.get(ROUTING_KEY_HEADER) or _first(first_death.get("routing-keys")),
        "dead_lettered_at": headers.get(DEAD_LETTERED_AT_HEADER) or str(first_death.get("time", "")),
        "body": message.body.decode(errors="replace"),
    }


def _first(values: Any) -> Any:
    return values[0] if isinstance(values, list) and values else None
