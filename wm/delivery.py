"""What a delivery carries: the event it decodes to, and the log context an operator searches it by."""

from __future__ import annotations

from collections.abc import Mapping

from aio_pika.abc import AbstractIncomingMessage
from pydantic import BaseModel, ValidationError

from schemas.events import EVENTS_BY_TYPE_NAME, Event
from wm.errors import InvalidMessage


def decode(message: AbstractIncomingMessage, accepted: Mapping[type[BaseModel], object]) -> Event:
    """The event in a delivery; ``InvalidMessage`` says precisely what is wrong with it."""
    if not message.message_id:
        raise InvalidMessage("missing AMQP property message_id")
    if message.content_type not in (None, "application/json"):
        raise InvalidMessage(f"content_type {message.content_type!r} is not application/json")
    event_class = EVENTS_BY_TYPE_NAME.get(message.type or "")
    if event_class is None or event_class not in accepted:
        raise InvalidMessage(f"unsupported event type {message.type!r}")
    try:
        return event_class.model_validate_json(message.body)
    except ValidationError as exc:
        raise InvalidMessage.from_validation(event_class.type_name(), exc) from exc


def event_context(event: BaseModel) -> dict[str, str]:
    """Log context an operator searches by: the study, and the ids the event is about."""
    fields = vars(event)  # not getattr: a missing attribute costs pydantic an exception
    context: dict[str, str] = {}
    dicom = fields.get("dicom")
    if dicom is not None:
        context["study_uid"] = dicom.study_instance_uid
    for key in ("bucket_id", "job_id", "export_task_id", "application_id"):
        value = fields.get(key)
        if value:
            context[key] = str(value)
    return context
