"""The service versions the docs say are tested are the ones these tests run on."""

from __future__ import annotations

import aio_pika
from pymongo import AsyncMongoClient

from devkit.services import REPO
from wm.config import Settings


async def test_the_docs_name_the_rabbitmq_and_mongodb_wire_versions_under_test(
    live_settings: Settings,
) -> None:
    connection = await aio_pika.connect(live_settings.bus.url)
    async with connection:
        properties = connection.transport.connection.server_properties  # type: ignore[union-attr]
        rabbitmq = properties["version"]
        rabbitmq = rabbitmq.decode() if isinstance(rabbitmq, bytes) else str(rabbitmq)
    client: AsyncMongoClient[dict[str, object]] = AsyncMongoClient(live_settings.mongo.url)
    try:
        mongo = (await client.server_info())["version"]
    finally:
        await client.close()
    readme = (REPO / "README.md").read_text()
    deployment = (REPO / "docs" / "deployment.md").read_text()

    assert f"RabbitMQ {rabbitmq}" in readme and f"RabbitMQ 3.10+** (tested: {rabbitmq})" in deployment
    assert f"reporting MongoDB {mongo}" in readme and f"reporting {mongo}" in deployment
