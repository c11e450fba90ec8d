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
from schemas.monai_ig import (
    IG_MESSAGES,
    ExportCompleteEvent,
    ExportRequestEvent,
    IgMessage,
    WorkflowRequestEvent,
)

SCHEMA_DIR = Path(__file__).parent / "jsonschema"
ASYNCAPI_PATH = Path(__file__).parent / "asyncapi.yaml"


def json_schema(event: type[Event]) -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of one event's message body."""
    schema = event.model_json_schema(mode="serialization")
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = f"https://mwm.example/schemas/{event.type_name()}.json"
    schema["title"] = event.__name__
    return schema


IG_CHANNELS: dict[type[IgMessage], tuple[str, str]] = {
    WorkflowRequestEvent: ("md.workflow.request", "receive"),
    ExportRequestEvent: ("md.export.request.{agent}", "send"),
    ExportCompleteEvent: ("md.export.complete", "receive"),
}
"""Each IG message's routing key on the IG's exchange, and whether MWM receives or sends it."""


def ig_json_schema(message: type[IgMessage]) -> dict[str, Any]:
    """The JSON Schema of an IG message's body, with the IG's property names (by alias)."""
    schema = message.model_json_schema(by_alias=True, mode="validation")
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = f"https://mwm.example/schemas/{_ig_file(message)}"
    schema["title"] = message.__name__
    return schema


def _ig_file(message: type[IgMessage]) -> str:
    return f"monai-ig.{message.message_type}.json"


def _ig_asyncapi(channels: dict[str, Any], operations: dict[str, Any], messages: dict[str, Any]) -> None:
    """The IG's channels: its own exchange and wire format (``type`` = the C# class name)."""
    for message, (address, action) in IG_CHANNELS.items():
        name = f"Ig{message.__name__}"
        messages[name] = {
            "name": message.message_type,
            "title": f"{message.__name__} (MONAI Informatics Gateway)",
            "summary": (message.__doc__ or "").strip().splitlines()[0],
            "contentType": "application/json",
            "correlationId": {"location": "$message.header#/correlation_id"},
            "headers": {"$ref": "#/components/schemas/AmqpProperties"},
            "payload": {"$ref": f"./jsonschema/{_ig_file(message)}"},
            "bindings": {"amqp": {"messageType": message.message_type, "deliveryMode": 2}},
        }
        channel: dict[str, Any] = {
            "address": address,
            "messages": {name: {"$ref": f"#/components/messages/{name}"}},
            "bindings": {
                "amqp": {
                    "is": "routingKey",
                    "exchange": {
                        "name": "monaideploy",
                        "type": "topic",
                        "durable": True,
                        "autoDelete": False,
                    },
                }
            },
        }
        if "{agent}" in address:
            channel["parameters"] = {
                "agent": {"description": "the IG's export agent: monaiscu or monaidicomweb"}
            }
        channels[name] = channel
        operations[f"{action}{name}"] = {
            "action": action,
            "channel": {"$ref": f"#/channels/{name}"},
            "messages": [{"$ref": f"#/channels/{name}/messages/{name}"}],
        }


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
    _ig_asyncapi(channels, operations, messages)
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
    for message in IG_MESSAGES:
        files[SCHEMA_DIR / _ig_file(message)] = (
            json.dumps(ig_json_schema(message), indent=2, sort_keys=True) + "\n"
        )
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
