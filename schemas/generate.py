"""Generate ``schemas/jsonschema/<event>.v<N>.json`` and ``schemas/asyncapi.yaml`` from the event models.

Run ``python -m schemas.generate`` after changing a model; ``tests/unit/test_schemas_drift.py`` fails
when the committed files differ from what the models produce.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import yaml

from schemas.events import EVENT_TYPES, Event

SCHEMA_DIR = Path(__file__).parent / "jsonschema"
ASYNCAPI_PATH = Path(__file__).parent / "asyncapi.yaml"


def json_schema(event: type[Event]) -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of one event's message body."""
    schema = event.model_json_schema(mode="serialization")
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = f"https://mwm.example/schemas/{event.type_name()}.json"
    schema["title"] = event.__name__
    return schema


def _channel_address(event: type[Event]) -> str:
    return (
        f"{event.event_type}.{{sinkType}}" if event.event_type == "mwm.export.requested" else event.event_type
    )


def asyncapi() -> dict[str, Any]:
    """An AsyncAPI 3.0 document describing every channel (routing key) and message of the bus."""
    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    messages: dict[str, Any] = {}
    for event in EVENT_TYPES:
        name = event.__name__
        messages[name] = {
            "name": event.type_name(),
            "title": name,
            "summary": (event.__doc__ or "").strip().splitlines()[0],
            "contentType": "application/json",
            "correlationId": {"location": "$message.header#/correlation_id"},
            "headers": {"$ref": "#/components/schemas/AmqpProperties"},
            "payload": {"$ref": f"./jsonschema/{event.type_name()}.json"},
            "bindings": {"amqp": {"messageType": event.type_name(), "deliveryMode": 2}},
        }
        channel: dict[str, Any] = {
            "address": _channel_address(event),
            "messages": {name: {"$ref": f"#/components/messages/{name}"}},
            "bindings": {
                "amqp": {
                    "is": "routingKey",
                    "exchange": {"name": "mwm", "type": "topic", "durable": True, "autoDelete": False},
                }
            },
        }
        if "{sinkType}" in channel["address"]:
            channel["parameters"] = {"sinkType": {"description": "the sink's type, e.g. dicom"}}
        channels[name] = channel
        operations[f"publish{name}"] = {
            "action": "send",
            "channel": {"$ref": f"#/channels/{name}"},
            "messages": [{"$ref": f"#/channels/{name}/messages/{name}"}],
        }
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "MWM event bus",
            "version": "0.1.0",
            "description": "Events MWM consumes and publishes on its RabbitMQ topic exchange. "
            "Every message is "
            "persistent JSON with the AMQP properties message_id, correlation_id, type "
            "(<event>.v<version>), timestamp, app_id and content_type.",
        },
        "defaultContentType": "application/json",
        "channels": channels,
        "operations": operations,
        "components": {
            "messages": messages,
            "schemas": {
                "AmqpProperties": {
                    "type": "object",
                    "required": [
                        "message_id",
                        "correlation_id",
                        "type",
                        "timestamp",
                        "app_id",
                        "content_type",
                    ],
                    "properties": {
                        "message_id": {"type": "string"},
                        "correlation_id": {"type": "string"},
                        "type": {"type": "string", "description": "<event type>.v<version>"},
                        "timestamp": {"type": "integer", "description": "unix seconds"},
                        "app_id": {"type": "string"},
                        "content_type": {"const": "application/json"},
                    },
                }
            },
        },
    }


def rendered_files() -> dict[Path, str]:
    """Every generated file and its content."""
    files = {
        SCHEMA_DIR / f"{event.type_name()}.json": json.dumps(json_schema(event), indent=2, sort_keys=True)
        + "\n"
        for event in EVENT_TYPES
    }
    files[ASYNCAPI_PATH] = yaml.safe_dump(asyncapi(), sort_keys=False, width=110)
    return files


def main() -> int:
    """Write the generated files."""
    SCHEMA_DIR.mkdir(exist_ok=True)
    for path, content in rendered_files().items():
        path.write_text(content)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
