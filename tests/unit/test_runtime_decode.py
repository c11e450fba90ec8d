"""Decoding deliveries: what the runtime dead-letters at once, and why."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

import pytest
from aio_pika.abc import AbstractIncomingMessage

from devkit.events import payload_arrived
from schemas.events import BucketReady, PayloadArrived
from wm.delivery import decode
from wm.errors import InvalidMessage

ACCEPTS: dict[type[Any], object] = {PayloadArrived: object()}


@dataclass
class Delivery:
    body: bytes
    message_id: str | None = "m1"
    type: str | None = "mwm.payload.arrived.v1"
    content_type: str | None = "application/json"


def as_message(delivery: Delivery) -> AbstractIncomingMessage:
    return cast(AbstractIncomingMessage, delivery)


def test_a_valid_delivery_decodes_to_its_event() -> None:
    event = payload_arrived()
    assert decode(as_message(Delivery(event.model_dump_json().encode())), ACCEPTS) == event


@pytest.mark.parametrize(
    ("delivery", "reason"),
    [
        (Delivery(b"{}", message_id=None), "missing AMQP property message_id"),
        (Delivery(b"{}", content_type="text/plain"), "is not application/json"),
        (Delivery(b"{}", type="mwm.unknown.v1"), "unsupported event type"),
        (Delivery(b"{}", type=BucketReady.type_name()), "unsupported event type"),
        (Delivery(b"not json"), "Invalid JSON"),
        (Delivery(b'{"payload_id": 1}'), "payload_id"),
    ],
)
def test_an_invalid_delivery_is_refused_with_a_precise_reason(delivery: Delivery, reason: str) -> None:
    with pytest.raises(InvalidMessage, match=reason):
        decode(as_message(delivery), ACCEPTS)
