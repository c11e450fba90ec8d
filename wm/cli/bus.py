"""Bus commands: run consumers, declare the topology, inspect and replay dead letters."""

from __future__ import annotations

import asyncio
import importlib
import uuid
from datetime import UTC, datetime
from importlib.metadata import entry_points
from typing import Annotated, Any

import aio_pika
import typer

from wm.adapters.rabbitmq import (
    Bus,
    dead_letter_queue_name,
    describe_dead_letter,
    persistent_copy,
    queue_name,
)
from wm.cli.output import OutputFormat, emit
from wm.cli.replay_notes import ReplayNotes
from wm.config import Settings
from wm.fleet import CONSUMER_GROUP, consumer_names
from wm.logging import configure_logging
from wm.runtime import Consumer, run_consumers


def available_consumers() -> list[str]:
    """Names of the consumers registered under the ``mwm.consumers`` entry-point group."""
    return consumer_names()


def resolve_consumer(name: str) -> Consumer[Any]:
    """A consumer by entry-point name, or by ``module:attribute`` for a site's own consumer."""
    if ":" in name:
        module_name, _, attribute = name.partition(":")
        try:
            consumer = getattr(importlib.import_module(module_name), attribute)
        except (ImportError, AttributeError) as exc:
            raise typer.BadParameter(f"cannot load consumer {name!r}: {exc}") from exc
    else:
        matches = [ep for ep in entry_points(group=CONSUMER_GROUP) if ep.name == name]
        if not matches:
            known = ", ".join(available_consumers()) or "none"
            raise typer.BadParameter(f"unknown consumer {name!r} (known: {known})")
        consumer = matches[0].load()
    if not isinstance(consumer, Consumer):
        raise typer.BadParameter(f"{name!r} is not a wm.runtime.Consumer")
    return consumer


def _settings() -> Settings:
    settings = Settings()
    configure_logging(settings.observability.log_format, settings.observability.log_level)
    return settings


def consume(name: Annotated[str, typer.Argument(help="consumer name, or module:attribute")]) -> None:
    """Run one consumer until SIGTERM, then drain in-flight messages and exit."""
    consumer = resolve_consumer(name)
    asyncio.run(run_consumers(_settings(), [consumer]))


def run_all() -> None:
    """Run every registered consumer in one process (a small site's deployment)."""
    settings = _settings()
    consumers = [resolve_consumer(name) for name in available_consumers()]
    consumers = [consumer for consumer in consumers if consumer.enabled(settings)]
    if not consumers:
        raise typer.BadParameter("no consumers are registered")
    asyncio.run(run_consumers(settings, consumers))


topology_app = typer.Typer(help="The broker topology.", no_args_is_help=True)


@topology_app.command("declare")
def topology_declare(
    names: Annotated[list[str] | None, typer.Argument(help="consumers (default: all registered)")] = None,
) -> None:
    """Declare the exchanges, every consumer queue and its dead-letter queue (idempotent)."""
    settings = _settings()
    consumers = [resolve_consumer(name) for name in (names or available_consumers())]

    async def declare() -> None:
        for consumer in consumers:
            if not consumer.enabled(settings):
                continue
            async with Bus(consumer.bus_settings(settings)) as bus:
                keys = consumer.bindings(settings)
                await bus.declare_consumer_queue(bus.channel, consumer.name, keys)
                typer.echo(f"declared {queue_name(bus.settings, consumer.name)}: " + ", ".join(keys))

    asyncio.run(declare())


dlq_app = typer.Typer(help="Dead letters: list, show, replay.", no_args_is_help=True)


async def _queue_depths(settings: Settings, consumers: list[str]) -> list[dict[str, Any]]:
    rows = []
    async with Bus(settings.bus) as bus:
        for consumer in consumers:
            channel = await bus.connection.channel()
            name = dead_letter_queue_name(settings.bus, consumer)
            try:
                queue = await channel.declare_queue(name, passive=True)
                depth: int | None = queue.declaration_result.message_count
            except aio_pika.exceptions.ChannelClosed:
                depth = None
            rows.append({"consumer": consumer, "queue": name, "messages": depth})
            if not channel.is_closed:
                await channel.close()
    return rows


@dlq_app.command("list")
def dlq_list(
    names: Annotated[list[str] | None, typer.Argument(help="consumers (default: all registered)")] = None,
    output: Annotated[OutputFormat, typer.Option("--output", "-o")] = OutputFormat.table,
) -> None:
    """How many dead letters each consumer has."""
    settings = _settings()
    rows = asyncio.run(_queue_depths(settings, names or available_consumers()))
    emit(rows, ["consumer", "queue", "messages"], output)


REPLAY_RUN_HEADER = "x-mwm-replay-run"
"""Set on every message a replay sends back: the run recognises its own messages if they come back."""


async def _take(
    settings: Settings, consumer: str, limit: int, replay: bool, message_id: str | None
) -> list[dict[str, Any]]:
    """Read up to ``limit`` of the dead letters the queue held when the command started.

    Replayed ones go back to the consumer's queue, the rest stay. Only the messages counted at the start
    (the snapshot) are read: a replayed message the consumer dead-letters again joins the queue's tail,
    behind them, so one run replays each message at most once (it also stops at a message stamped with
    its own run id, should the count have been stale). A replay whose effect is decided already (a
    ``bucket.ready`` whose job ended) stays in the queue, and its row says why (`wm.cli.replay_notes`).
    """
    run = uuid.uuid4().hex
    shown: list[dict[str, Any]] = []
    async with Bus(settings.bus) as bus, ReplayNotes(settings, enabled=replay) as notes:
        channel = await bus.connection.channel()
        queue = await channel.declare_queue(dead_letter_queue_name(settings.bus, consumer), passive=True)
        snapshot = queue.declaration_result.message_count or 0
        held = []
        for _ in range(snapshot):
            if len(shown) >= limit:
                break
            message = await queue.get(no_ack=False, fail=False)
            if message is None:
                break
            held.append(message)
            if (message.headers or {}).get(REPLAY_RUN_HEADER) == run:
                break  # this run's own replay, dead-lettered again: the snapshot is done
            facts = dict(describe_dead_letter(message))
            if message_id and message.message_id != message_id:
                continue
            if replay:
                note = await notes.why_not(message)
                if note is None:
                    await bus.send_to_queue(_replayable(message, run), queue_name(settings.bus, consumer))
                    await message.ack()
                    held.remove(message)
                facts["replayed"] = note is None
                facts["note"] = note or ""
            shown.append(facts)
        for message in held:
            await message.nack(requeue=True)
        await channel.close()
    return shown


def _replayable(message: aio_pika.abc.AbstractIncomingMessage, run: str) -> aio_pika.Message:
    headers = {
        k: v for k, v in (message.headers or {}).items() if not k.startswith(("x-mwm-", "x-death", "x-first"))
    }
    headers["x-mwm-replayed-at"] = datetime.now(UTC).isoformat()
    headers[REPLAY_RUN_HEADER] = run
    return persistent_copy(message, headers)


@dlq_app.command("show")
def dlq_show(
    consumer: Annotated[str, typer.Argument(help="consumer name")],
    limit: Annotated[int, typer.Option(min=1, max=1000)] = 20,
    output: Annotated[OutputFormat, typer.Option("--output", "-o")] = OutputFormat.table,
) -> None:
    """Show dead letters with their reason (they stay in the queue)."""
    rows = asyncio.run(_take(_settings(), consumer, limit, replay=False, message_id=None))
    emit(rows, ["message_id", "type", "reason", "dead_lettered_at"], output)


@dlq_app.command("replay")
def dlq_replay(
    consumer: Annotated[str, typer.Argument(help="consumer name")],
    limit: Annotated[int, typer.Option(min=1, max=100000)] = 100,
    message_id: Annotated[str | None, typer.Option(help="replay only this message")] = None,
    output: Annotated[OutputFormat, typer.Option("--output", "-o")] = OutputFormat.table,
) -> None:
    """Send dead letters back to their consumer's queue (only that consumer sees them again)."""
    rows = asyncio.run(_take(_settings(), consumer, limit, replay=True, message_id=message_id))
    emit(rows, ["message_id", "type", "reason", "replayed", "note"], output)
