"""An emulator of the MONAI Deploy Informatics Gateway (IG) on the real broker, object store and DICOM peers.

It behaves as the upstream C# code does (``../shared/reference/monai-ig-wire.md``), version by version:

- Topology as Monai.Deploy.Messaging declares it: a durable topic exchange and a *topic* dead-letter
  exchange; a subscribed queue is named after its routing key, quorum, with ``x-delivery-limit`` and
  ``x-dead-letter-exchange`` (no dead-letter routing key), plus a classic durable ``<queue>-dead-letter``
  bound to the dead-letter exchange with the same key.
- Storage as the IG's upload service: ``{payload_id}/dcm/{study}/{series}/{sop}.dcm`` and its DICOM JSON
  (bulk VRs left out) as ``.dcm.json``, with the user metadata ``FILESOURCE`` and ``WORKFLOWS``.
- ``md.workflow.request`` published with the messaging library's properties (a new UUID per publish, the
  class name as ``type``, persistent, ``app_id`` 16988a78-..., Unix-seconds timestamp) and a Newtonsoft
  body (compact, nulls kept, enums as integers, UTC times with trailing zeros dropped), per IG version.
- The export service: consumes ``md.export.request.<agent>``, downloads each file from its own bucket,
  C-STOREs it (calling AE ``MONAISCU``) to the destination registered under the request's name, and
  publishes ``md.export.complete`` (status by name, file statuses as integers). IG 0.4 acks the request
  first, then publishes; IG 0.5 publishes first, then acks. A body that does not deserialize is left
  unacknowledged, as upstream.
"""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote, urlsplit, urlunsplit

import aio_pika
import httpx
import pydicom
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustChannel, AbstractRobustExchange
from minio import Minio
from pynetdicom import AE

from wm.config import Settings

Version = Literal["0.3", "0.4", "0.5"]
VERSIONS: tuple[Version, ...] = ("0.3", "0.4", "0.5")
APP_ID = "16988a78-87b5-4168-a5c3-2cfc2bab8e54"
SCU_AE_TITLE = "MONAISCU"
BULK_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN"})
CT = 10  # ArtifactType.CT in messaging 2.0
FILE_SUCCESS, CONFIGURATION_ERROR, UNSUPPORTED_DATA_TYPE, SERVICE_ERROR, DOWNLOAD_ERROR = 0, 1, 2, 3, 4


def newtonsoft_time(moment: datetime) -> str:
    """A UTC ``DateTime`` as Newtonsoft writes it: up to 7 fractional digits, trailing zeros dropped."""
    text = moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S")
    fraction = f"{moment.microsecond:06d}0".rstrip("0")
    return f"{text}.{fraction}Z" if fraction else f"{text}Z"


def newtonsoft(body: dict[str, Any]) -> bytes:
    """Newtonsoft's default output: compact, nulls included, non-ASCII kept."""
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()


def dicom_json(path: Path) -> dict[str, Any]:
    """The DICOM JSON model the IG writes next to a file (``writeDicomJson``: bulk VRs left out)."""
    dataset = pydicom.dcmread(path, stop_before_pixels=True)
    for element in list(dataset):
        if element.VR in BULK_VRS:
            del dataset[element.tag]
    return dataset.to_json_dict()


def workflow_request_body(
    version: Version,
    *,
    payload_id: str,
    correlation_id: str,
    bucket: str,
    workflows: Sequence[str],
    calling_ae: str,
    called_ae: str,
    paths: Sequence[str],
    timestamp: datetime,
) -> dict[str, Any]:
    """A ``WorkflowRequestEvent`` as each library version serializes it (its properties in class order)."""
    body: dict[str, Any] = {
        "payload_id": payload_id,
        "workflows": list(workflows),
        "file_count": len(paths),
        "correlation_id": correlation_id,
        "bucket": bucket,
    }
    if version == "0.3":
        body |= {"calling_aetitle": calling_ae, "called_aetitle": called_ae}
    else:
        trigger: dict[str, Any] = {"dataService": 1, "source": calling_ae, "destination": called_ae}
        if version == "0.5":
            trigger["artifactType"] = CT
        body |= {"trigger": trigger, "data_origins": []}
    body["timestamp"] = newtonsoft_time(timestamp)
    if version != "0.3":
        body |= {"workflow_instance_id": None, "task_id": None}
    body["payload"] = [{"path": path, "metadata": f"{path}.json"} for path in paths]
    return body


def export_complete_body(
    version: Version, request: dict[str, Any], status: str, message: str, file_statuses: dict[str, int]
) -> dict[str, Any]:
    """An ``ExportCompleteEvent`` for a request, as each version serializes it."""
    body: dict[str, Any] = {
        "workflow_instance_id": request["workflow_instance_id"],
        "export_task_id": request["export_task_id"],
        "status": status,
        "message": message,
        "file_statuses": file_statuses,
    }
    if version == "0.5":
        body["Target"] = None
    return body


def properties(message_type: str, correlation_id: str) -> dict[str, Any]:
    """The AMQP properties Monai.Deploy.Messaging sets on every publish."""
    return {
        "content_type": "application/json",
        "delivery_mode": aio_pika.DeliveryMode.PERSISTENT,
        "message_id": str(uuid.uuid4()),
        "app_id": APP_ID,
        "correlation_id": correlation_id,
        "type": message_type,
        "timestamp": datetime.now(UTC),
    }


def management_url() -> str:
    """The RabbitMQ management API of this environment's stack (``scripts/services``)."""
    offset = int(os.environ.get("MWM_SERVICES_PORT_OFFSET") or 0)
    return f"http://127.0.0.1:{15672 + offset}"


@asynccontextmanager
async def vhost(settings: Settings, name: str) -> AsyncIterator[str]:
    """A virtual host of its own for one test (the IG's ``monaideploy`` stand-in); its AMQP URL."""
    auth = httpx.BasicAuth("guest", "guest")
    async with httpx.AsyncClient(base_url=management_url(), auth=auth, timeout=30) as client:
        quoted = quote(name, safe="")
        (await client.put(f"/api/vhosts/{quoted}")).raise_for_status()
        permissions = {"configure": ".*", "write": ".*", "read": ".*"}
        (await client.put(f"/api/permissions/{quoted}/guest", json=permissions)).raise_for_status()
        try:
            yield urlunsplit(urlsplit(settings.bus.url)._replace(path="/" + quoted))
        finally:
            await client.delete(f"/api/vhosts/{quoted}")


@dataclass
class Destination:
    """A DICOM destination registered in the IG (``POST /config/destination``)."""

    ae_title: str
    host: str
    port: int


@dataclass
class ExportRecord:
    """One export request the emulator handled, and the completion it sent (None: dropped)."""

    request: dict[str, Any]
    completion: dict[str, Any] | None


@dataclass
class IgEmulator:
    """The gateway: ``send_study`` uploads and announces a payload; export requests are served in the
    background. ``drop_completions`` never publishes one; ``duplicate_completions`` publishes each twice."""

    version: Version
    url: str
    settings: Settings
    bucket: str = "monaideploy"
    exchange: str = "monaideploy"
    dead_letter_exchange: str = "monaideploy-dead-letter"
    delivery_limit: int = 3
    agent: str = "monaiscu"
    destinations: dict[str, Destination] = field(default_factory=dict)
    drop_completions: bool = False
    duplicate_completions: bool = False
    exports: list[ExportRecord] = field(default_factory=list)
    unparsed: list[bytes] = field(default_factory=list)
    _connection: aio_pika.abc.AbstractRobustConnection | None = None
    _channel: AbstractRobustChannel | None = None
    _exchange: AbstractRobustExchange | None = None

    def __post_init__(self) -> None:
        store = self.settings.object_store
        self.s3 = Minio(
            store.endpoint,
            access_key=store.access_key,
            secret_key=store.secret_key,
            secure=store.secure,
            region=store.region,
        )

    async def __aenter__(self) -> IgEmulator:
        if not await asyncio.to_thread(self.s3.bucket_exists, self.bucket):
            await asyncio.to_thread(self.s3.make_bucket, self.bucket)
        self._connection = await aio_pika.connect_robust(self.url, reconnect_interval=0.5)
        self._channel = await self._connection.channel(publisher_confirms=True)
        self._exchange = await self._channel.declare_exchange(
            self.exchange, aio_pika.ExchangeType.TOPIC, durable=True
        )
        await self._channel.declare_exchange(
            self.dead_letter_exchange, aio_pika.ExchangeType.TOPIC, durable=True
        )
        consuming = await self._connection.channel()
        await consuming.set_qos(prefetch_count=1)
        queue = await self.declare_queue(consuming, f"md.export.request.{self.agent}")
        await queue.consume(self._on_export_request)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._connection is not None:
            await self._connection.close()

    async def declare_queue(
        self, channel: AbstractRobustChannel, routing_key: str
    ) -> aio_pika.abc.AbstractQueue:
        """Subscribe as the messaging library does: queue = routing key, quorum, delivery limit, DLX."""
        exchange = await channel.declare_exchange(self.exchange, aio_pika.ExchangeType.TOPIC, durable=True)
        dead_letters = await channel.declare_exchange(
            self.dead_letter_exchange, aio_pika.ExchangeType.TOPIC, durable=True
        )
        queue = await channel.declare_queue(
            routing_key,
            durable=True,
            arguments={
                "x-queue-type": "quorum",
                "x-delivery-limit": self.delivery_limit,
                "x-dead-letter-exchange": self.dead_letter_exchange,
            },
        )
        await queue.bind(exchange, routing_key)
        dead_letter_queue = await channel.declare_queue(f"{routing_key}-dead-letter", durable=True)
        await dead_letter_queue.bind(dead_letters, routing_key)
        return queue

    async def upload(
        self, files: Sequence[Path], payload_id: str, calling_ae: str, workflows: Sequence[str]
    ) -> list[str]:
        """Store the files and their DICOM JSON as the IG does; their paths relative to the payload."""
        metadata: dict[str, str | list[str] | tuple[str]] = {
            "FILESOURCE": calling_ae,
            "WORKFLOWS": ",".join(workflows),
        }

        def put(path: Path) -> str:
            dataset = pydicom.dcmread(path, stop_before_pixels=True)
            relative = (
                f"dcm/{dataset.StudyInstanceUID}/{dataset.SeriesInstanceUID}/{dataset.SOPInstanceUID}.dcm"
            )
            key = f"{payload_id}/{relative}"
            self.s3.fput_object(
                self.bucket, key, str(path), content_type="application/dicom", metadata=metadata
            )
            document = json.dumps(dicom_json(path)).encode()
            with tempfile.NamedTemporaryFile() as sidecar:
                sidecar.write(document)
                sidecar.flush()
                self.s3.fput_object(
                    self.bucket,
                    f"{key}.json",
                    sidecar.name,
                    content_type="application/json",
                    metadata=metadata,
                )
            return relative

        return list(await asyncio.gather(*(asyncio.to_thread(put, path) for path in files)))

    async def send_study(
        self,
        files: Sequence[Path],
        *,
        calling_ae: str = "MODALITY",
        called_ae: str = "MONAI-MIP",
        workflows: Sequence[str] = (),
        payload_id: str | None = None,
    ) -> str:
        """Receive ``files`` as one payload: upload them, then publish ``md.workflow.request``."""
        payload_id = payload_id or str(uuid.uuid4())
        paths = await self.upload(files, payload_id, calling_ae, workflows)
        await self.publish_request(
            payload_id, paths, calling_ae=calling_ae, called_ae=called_ae, workflows=workflows
        )
        return payload_id

    async def publish_request(
        self,
        payload_id: str,
        paths: Sequence[str],
        *,
        calling_ae: str = "MODALITY",
        called_ae: str = "MONAI-MIP",
        workflows: Sequence[str] = (),
    ) -> str:
        """Announce an uploaded payload: ``md.workflow.request``; returns its correlation id."""
        correlation_id = str(uuid.uuid4())
        body = workflow_request_body(
            self.version,
            payload_id=payload_id,
            correlation_id=correlation_id,
            bucket=self.bucket,
            workflows=workflows,
            calling_ae=calling_ae,
            called_ae=called_ae,
            paths=paths,
            timestamp=datetime.now(UTC),
        )
        props = properties("WorkflowRequestEvent", correlation_id)
        await self.publish(newtonsoft(body), "md.workflow.request", **props)
        return correlation_id

    async def publish(self, body: bytes, routing_key: str, **message_properties: Any) -> None:
        """Publish as the library does: persistent, confirmed, not mandatory."""
        assert self._exchange is not None
        await self._exchange.publish(
            aio_pika.Message(body=body, **message_properties), routing_key, timeout=10
        )

    async def _on_export_request(self, message: AbstractIncomingMessage) -> None:
        try:
            request = {key.lower(): value for key, value in json.loads(message.body).items()}
            files, destinations = list(request["files"]), list(request["destinations"])
            if not files or not request["export_task_id"] or not request["workflow_instance_id"]:
                raise ValueError("invalid export request")
        except (ValueError, KeyError, TypeError, AttributeError):
            self.unparsed.append(message.body)  # upstream: logged, left unacknowledged
            return
        statuses, errors = await asyncio.to_thread(self._export, files, destinations)
        failed = sum(1 for status in statuses.values() if status != FILE_SUCCESS)
        status = "Success" if not failed else "Failure" if failed == len(statuses) else "PartialFailure"
        completion = export_complete_body(self.version, request, status, "\n".join(errors), statuses)
        self.exports.append(ExportRecord(request, None if self.drop_completions else completion))
        if self.version == "0.4":
            await message.ack()
        if not self.drop_completions:
            for _ in range(2 if self.duplicate_completions else 1):
                correlation_id = str(request["correlation_id"])
                props = properties("ExportCompleteEvent", correlation_id)
                await self.publish(newtonsoft(completion), "md.export.complete", **props)
        if self.version != "0.4":
            await message.ack()

    def _export(self, files: list[str], destinations: list[str]) -> tuple[dict[str, int], list[str]]:
        statuses = {key: FILE_SUCCESS for key in files}
        errors: list[str] = []
        with tempfile.TemporaryDirectory() as scratch:
            local: dict[str, Path] = {}
            for key in files:
                path = Path(scratch) / uuid.uuid4().hex
                try:
                    self.s3.fget_object(self.bucket, key, str(path))
                    local[key] = path
                except Exception as exc:
                    statuses[key] = DOWNLOAD_ERROR
                    errors.append(f"{key}: download failed: {exc}")
            for name in destinations:
                destination = self.destinations.get(name)
                if destination is None:
                    errors.append(f"destination {name!r} is not registered")
                    statuses.update({key: CONFIGURATION_ERROR for key in local})
                    continue
                self._store(destination, local, statuses, errors)
        return statuses, errors

    def _store(
        self, destination: Destination, local: dict[str, Path], statuses: dict[str, int], errors: list[str]
    ) -> None:
        datasets = {}
        for key, path in local.items():
            try:
                datasets[key] = pydicom.dcmread(path)
            except Exception as exc:  # upstream: not DICOM -> UnsupportedDataType
                statuses[key] = UNSUPPORTED_DATA_TYPE
                errors.append(f"{key}: not DICOM: {exc}")
        if not datasets:
            return
        ae = AE(ae_title=SCU_AE_TITLE)
        for dataset in datasets.values():
            ae.add_requested_context(dataset.SOPClassUID, dataset.file_meta.TransferSyntaxUID)
        association = ae.associate(destination.host, destination.port, ae_title=destination.ae_title)
        if not association.is_established:
            errors.append(f"association with {destination.ae_title} failed")
            statuses.update({key: SERVICE_ERROR for key in datasets})
            return
        try:
            for key, dataset in datasets.items():
                status = association.send_c_store(dataset)
                if not status or status.Status != 0:
                    statuses[key] = SERVICE_ERROR
                    errors.append(f"{key}: C-STORE failed")
        finally:
            association.release()
