"""The MONAI Informatics Gateway's broker: where MWM's IG queues live, how IG messages decode and encode.

MWM's IG consumers read queues of MWM's own (``<bus.queue_prefix>.<consumer>``) declared on the IG's vhost
and bound to the IG's exchange, with MWM's own dead-letter exchange there; the IG's queues are never
declared. A delivery is checked as the IG's messaging library checks it (``message_id``, ``type``,
``content_type``, ``app_id`` and ``correlation_id`` present and not blank), then its body parsed with the
tolerant models of ``schemas.monai_ig``. MWM publishes with the properties that library sets.
"""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime
from typing import TypeVar
from urllib.parse import quote, urlsplit, urlunsplit

import aio_pika
from aio_pika.abc import AbstractIncomingMessage
from pydantic import ValidationError

from schemas.monai_ig import IgMessage
from wm.adapters.rabbitmq import Bus
from wm.config import BusSettings, Settings
from wm.errors import InvalidMessage, TransientError
from wm.service_layer.periodic import every

M = TypeVar("M", bound=IgMessage)

REQUIRED_PROPERTIES = ("message_id", "type", "content_type", "app_id", "correlation_id")
"""AMQP properties the IG's subscriber requires (a message lacking one is rejected there too)."""


def ig_url(settings: Settings) -> str:
    """The IG broker's AMQP URL: ``ig.url`` (else MWM's broker) on the vhost ``ig.vhost``."""
    parts = urlsplit(settings.ig.url or settings.bus.url)
    return urlunsplit(parts._replace(path="/" + quote(settings.ig.vhost, safe="")))


def ig_bus_settings(settings: Settings) -> BusSettings:
    """MWM's bus settings, pointed at the IG's broker, vhost and exchange (queue names stay MWM's)."""
    return settings.bus.model_copy(
        update={
            "url": ig_url(settings),
            "exchange": settings.ig.exchange,
            "dead_letter_exchange": settings.ig.dead_letter_exchange,
            "app_id": settings.ig.app_id,
        }
    )


def decode(message: AbstractIncomingMessage, model: type[M]) -> M:
    """The IG message in a delivery; ``InvalidMessage`` names the missing property or the body's errors."""
    for name in REQUIRED_PROPERTIES:
        value = getattr(message, name)
        if value is None or not str(value).strip():
            raise InvalidMessage(f"missing AMQP property {name} (the IG's messaging library requires it)")
    if message.type != model.message_type:
        raise InvalidMessage(f"type {message.type!r} is not {model.message_type}")
    if message.content_type != "application/json":
        raise InvalidMessage(f"content_type {message.content_type!r} is not application/json")
    try:
        return model.model_validate_json(message.body)
    except ValidationError as exc:
        raise InvalidMessage.from_validation(model.message_type, exc) from exc


def message_for(body: IgMessage, correlation_id: str, app_id: str) -> aio_pika.Message:
    """An IG message with the properties its messaging library sets: a new UUID per publish, the class
    name as ``type``, persistent, Unix-seconds timestamp; the body in Newtonsoft's shape (nulls kept)."""
    return aio_pika.Message(
        body=body.model_dump_json(by_alias=True).encode(),
        content_type="application/json",
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        message_id=str(uuid.uuid4()),
        correlation_id=correlation_id,
        type=body.message_type,
        timestamp=datetime.now(UTC),
        app_id=app_id,
    )


class IgPublisher:
    """Publishes to the IG's exchange, over a connection ``run`` keeps open (a consumer's background task).

    Until that connection is up, ``publish`` raises ``TransientError``: the runtime retries the handler.
    """

    def __init__(self, settings: Settings) -> None:
        self._settings = ig_bus_settings(settings)
        self._bus: Bus | None = None

    async def run(self, stop: asyncio.Event) -> None:
        """Connect (retrying while the broker is down) and hold the connection until ``stop`` is set."""

        async def connected() -> None:
            try:
                async with Bus(self._settings) as bus:
                    self._bus = bus
                    await stop.wait()
            finally:
                self._bus = None

        await every(self._settings.reconnect_interval_s, stop, connected, "ig_broker_connection")

    async def publish(self, body: IgMessage, routing_key: str, correlation_id: str) -> str:
        """Publish with confirms; ``mandatory``: with no IG queue bound it fails (``TransientError``) rather
        than vanish. Returns the message id."""
        if self._bus is None:
            raise TransientError("not connected to the IG's broker yet")
        message = message_for(body, correlation_id, self._settings.app_id)
        await self._bus.publish_message(message, routing_key)
        return str(message.message_id)
