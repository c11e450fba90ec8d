"""IG requests: turn a MONAI Informatics Gateway's ``md.workflow.request`` into MWM work.

Queue ``<bus.queue_prefix>.ig-requests`` on the IG's broker (``ig.vhost``), bound to ``ig.exchange`` with
``ig.workflow_request_key``: MWM's own queue, so a real Workflow Manager's ``md.workflow.request`` queue on
the same vhost keeps getting its copy.

- In: ``WorkflowRequestEvent`` (IG 0.3, 0.4 or 0.5 body). One carrying ``workflow_instance_id`` and
  ``task_id`` returns artifacts to a Workflow Manager's task: acknowledged and ignored, as the WM does.
- Decisions: each file's identifiers come from its ``.dcm.json``, or from its DICOM header when that is
  missing or incomplete. The candidate applications are those ``workflows`` names, else those mapped to
  the called AE title (``trigger.destination``, or the 0.3 ``called_aetitle``); their filters (calling
  AE title from ``trigger.source``) decide as for any file (``wm.domain.discovery``).
- Effects: the files stay where the IG put them (the scheduler's staging copies them across buckets into
  the job's input prefix). By default (``ig.regroup`` off), one
  ``BucketReady`` per matched application with all the files it accepted (message id = the bucket id,
  derived from the payload id): the request is a complete payload and waits no second quiet period. With
  ``ig.regroup``, one ``PayloadArrived`` per file instead: discovery groups them by its own rules.
- Idempotency: ids derive from the payload id and keys; the scheduler creates one job per bucket id.
- Failure: a message lacking a required property or with a body that does not parse is dead-lettered at
  once with the reason (MWM's dead-letter queue ``<queue>.dead-letter`` on the IG's vhost); a file that
  is neither described nor readable DICOM dead-letters the request; store or broker outages are retried.
"""

from __future__ import annotations

import asyncio
import json
import re
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import structlog

from producers.publisher import file_message_id
from schemas.events import BucketFile, DicomIdentifiers, FileRef, PayloadArrived
from schemas.monai_ig import DataService, WorkflowRequestEvent
from wm import metrics
from wm.config import IgSettings
from wm.dicom import read_identifiers
from wm.domain.discovery import Candidate, Placement, placements
from wm.domain.monai_ig import (
    RequestedFile,
    application_names,
    direct_buckets,
    identifiers_from_dicom_json,
    requested_files,
)
from wm.errors import PermanentError
from wm.ig_queues import ig_enabled, ig_queue
from wm.ports import ApplicationCatalog, BucketObjects, EventPublisher
from wm.registry import INDEXES as REGISTRY_INDEXES
from wm.runtime import Consumer, Services
from wm.stores.catalog import RegistryCatalog

log = structlog.get_logger("consumers.ig_requests")

NAME = "ig-requests"
_IDENTIFIER = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")


@dataclass(frozen=True)
class IgRequestDeps:
    """The ports the IG request consumer uses."""

    catalog: ApplicationCatalog
    objects: BucketObjects
    publisher: EventPublisher
    settings: IgSettings
    work_dir: Path


async def handle(request: WorkflowRequestEvent, deps: IgRequestDeps) -> None:
    """Stage the request's files and hand them to MWM: one bucket per application, or to discovery."""
    if request.returns_artifacts:
        log.info("ig_artifacts_ignored", workflow_instance_id=request.workflow_instance_id)
        return
    arrivals = await _arrivals(request, deps)
    if deps.settings.regroup:
        await asyncio.gather(
            *(deps.publisher.publish(a, message_id=file_message_id(a.file)) for a in arrivals)
        )
        return
    candidates = await _candidates(arrivals[0], deps)
    placed: list[tuple[Placement, BucketFile]] = []
    for arrival in arrivals:
        accepted, refused = placements(candidates, arrival)
        placed += [(placement, BucketFile(file=arrival.file, dicom=arrival.dicom)) for placement in accepted]
        if not accepted:
            metrics.UNMATCHED_FILES.labels(arrival.called_ae_title or "-").inc()
            log.info("ig_file_unmatched", key=arrival.file.key, refused=refused)
    buckets = direct_buckets(request.payload_id, arrivals[0].correlation_id, placed, datetime.now(UTC))
    for bucket in buckets:
        await deps.publisher.publish(bucket, message_id=bucket.bucket_id)
    log.info("ig_request_accepted", files=len(arrivals), buckets=[bucket.bucket_id for bucket in buckets])


async def _candidates(arrival: PayloadArrived, deps: IgRequestDeps) -> list[Candidate]:
    """The applications ``workflows`` names, else those mapped to the called AE title."""
    if arrival.application_ids:
        named = await deps.catalog.candidates(arrival)
        if named:
            return named
    return await deps.catalog.candidates(arrival.model_copy(update={"application_ids": []}))


async def _arrivals(request: WorkflowRequestEvent, deps: IgRequestDeps) -> list[PayloadArrived]:
    source = deps.objects.in_bucket(request.bucket)
    files = requested_files(request)
    sizes = {ref.key: ref.size for ref in await source.list(f"{request.payload_id}/")}
    missing = [file.key for file in files if file.key not in sizes]
    if missing:
        raise PermanentError(f"{len(missing)} file(s) not in bucket {request.bucket!r}, first {missing[0]!r}")
    identifiers = await asyncio.gather(*(_identifiers(file, sizes, source, deps) for file in files))
    refs = [FileRef(bucket=request.bucket, key=file.key, size=sizes[file.key]) for file in files]
    dimse = request.trigger is None or request.trigger.data_service is DataService.DIMSE
    correlation_id = (
        request.correlation_id if _IDENTIFIER.match(request.correlation_id) else request.payload_id
    )
    return [
        PayloadArrived(
            correlation_id=correlation_id,
            payload_id=request.payload_id,
            file=ref,
            dicom=ids,
            calling_ae_title=request.calling_ae_title if dimse else None,
            called_ae_title=request.called_ae_title if dimse else None,
            source="external",
            application_ids=application_names(request.workflows),
        )
        for ref, ids in zip(refs, identifiers, strict=True)
    ]


async def _identifiers(
    file: RequestedFile, sizes: dict[str, int], source: BucketObjects, deps: IgRequestDeps
) -> DicomIdentifiers:
    """From the ``.dcm.json`` when it has them all, else from the DICOM header."""
    if file.metadata_key is not None and file.metadata_key in sizes:
        document = b"".join([chunk async for chunk in source.stream(file.metadata_key)])
        try:
            found = identifiers_from_dicom_json(json.loads(document))
        except ValueError:
            found = None
        if found is not None:
            return found
        log.info("ig_dicom_json_incomplete", key=file.metadata_key)
    with tempfile.TemporaryDirectory(dir=deps.work_dir) as scratch:
        path = Path(scratch) / "header.dcm"
        await source.download_file(file.key, path)
        return read_identifiers(path)


def build(services: Services) -> IgRequestDeps:
    """Wire the ports to the process's shared connections."""
    settings = services.settings
    work_dir = Path(settings.work_dir) / "ig-requests"
    work_dir.mkdir(parents=True, exist_ok=True)
    catalog = RegistryCatalog(services.database, settings.discovery.catalog_ttl_s)
    return IgRequestDeps(catalog, services.objects, services.bus, settings.ig, work_dir)


CONSUMER = Consumer[IgRequestDeps](
    name=NAME,
    handlers={WorkflowRequestEvent: handle},
    build_deps=build,
    routing_keys=("md.workflow.request",),
    indexes=REGISTRY_INDEXES,
    source=ig_queue(WorkflowRequestEvent, lambda ig: ig.workflow_request_key),
    enabled_when=ig_enabled,
)
