"""The IG's vhost: the emulator's queues as the IG declares them, and MWM's own beside them."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import httpx
import pytest

from devkit.ig_emulator import management_url
from devkit.ig_loop import IG_CONSUMERS, ig_stack
from devkit.pipeline import consumers_running
from wm.adapters.rabbitmq import dead_letter_queue_name, queue_name
from wm.config import Settings

pytestmark = pytest.mark.integration


async def management(path: str) -> Any:
    """A GET on the RabbitMQ management API of this stack."""
    auth = httpx.BasicAuth("guest", "guest")
    async with httpx.AsyncClient(base_url=management_url(), auth=auth, timeout=30) as client:
        response = await client.get(path)
        response.raise_for_status()
        return response.json()


async def test_the_emulator_declares_the_igs_topology_and_mwm_only_queues_of_its_own(
    live_settings: Settings,
) -> None:
    async with ig_stack(live_settings, "0.4") as (settings, _), consumers_running(settings, IG_CONSUMERS):
        vhost = quote(settings.ig.vhost, safe="")
        queues = {queue["name"]: queue for queue in await management(f"/api/queues/{vhost}")}
        exchanges = {exchange["name"]: exchange for exchange in await management(f"/api/exchanges/{vhost}")}
        bindings = {
            (binding["source"], binding["destination"], binding["routing_key"])
            for binding in await management(f"/api/bindings/{vhost}")
        }
    # The IG's side, as Monai.Deploy.Messaging subscribes: queue = routing key, quorum, delivery limit,
    # a topic dead-letter exchange without a dead-letter routing key, a classic <queue>-dead-letter.
    request = "md.export.request.monaiscu"
    assert queues[request]["arguments"] == {
        "x-queue-type": "quorum",
        "x-delivery-limit": 3,
        "x-dead-letter-exchange": "monaideploy-dead-letter",
    }
    assert (
        queues[f"{request}-dead-letter"]["type"] == "classic" and queues[f"{request}-dead-letter"]["durable"]
    )
    assert exchanges["monaideploy"]["type"] == exchanges["monaideploy-dead-letter"]["type"] == "topic"
    assert ("monaideploy", request, request) in bindings
    assert ("monaideploy-dead-letter", f"{request}-dead-letter", request) in bindings
    # MWM's side: queues of its own name on the IG's exchange, dead letters to its own exchange there.
    ig_bus = settings.bus
    mine = {
        name
        for consumer in ("ig-requests", "ig-completions")
        for name in (queue_name(ig_bus, consumer), dead_letter_queue_name(ig_bus, consumer))
    }
    assert set(queues) == mine | {request, f"{request}-dead-letter"}, "no queue the IG owns"
    assert ("monaideploy", queue_name(ig_bus, "ig-requests"), "md.workflow.request") in bindings
    assert ("monaideploy", queue_name(ig_bus, "ig-completions"), "md.export.complete") in bindings
    assert (
        queues[queue_name(ig_bus, "ig-requests")]["arguments"]["x-dead-letter-exchange"] == "mwm.dead-letter"
    )
