"""Discovery: match each arrived file to applications and add it to their open buckets.

Queue ``mwm.discovery``, bound to ``mwm.payload.arrived``.

- In: ``PayloadArrived`` (one DICOM file in the object store).
- Decisions: the candidate applications are those the event names (``application_ids``) or, failing that,
  those mapped to its called AE title; each one's filters (modality, SOP class, calling AE) and grouping tag
  decide whether and where the file goes (``wm.domain.discovery``).
- Effects: the file joins the open bucket of each (application revision, grouping value) and the bucket's
  quiet-period timer is re-armed. The background timer closes due buckets and publishes ``BucketReady``
  (``wm.service_layer.timers``).
- Idempotency: a file's id in a bucket is its bucket key plus object key; a redelivered event adds nothing.
- Failure: a file that matches nothing is acknowledged, logged and counted (``mwm_unmatched_files_total``),
  never requeued. A database outage is retried by the runtime, then dead-lettered.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import structlog

from schemas.events import PayloadArrived
from wm import metrics
from wm.domain.discovery import placements
from wm.ports import ApplicationCatalog, BucketRecords, QuietPeriodTimers
from wm.registry import INDEXES as REGISTRY_INDEXES
from wm.runtime import Consumer, Services
from wm.service_layer import timers
from wm.stores import buckets
from wm.stores.buckets import BucketStore
from wm.stores.catalog import RegistryCatalog

log = structlog.get_logger("consumers.discovery")

NAME = "discovery"


@dataclass(frozen=True)
class DiscoveryDeps:
    """The ports discovery uses."""

    catalog: ApplicationCatalog
    buckets: BucketRecords
    timers: QuietPeriodTimers


async def handle(event: PayloadArrived, deps: DiscoveryDeps) -> None:
    """Add the file to the open bucket of every application that wants it."""
    candidates = await deps.catalog.candidates(event)
    placed, refused = placements(candidates, event)
    if not placed:
        metrics.UNMATCHED_FILES.labels(event.called_ae_title or "-").inc()
        log.info("file_unmatched", called_ae=event.called_ae_title, key=event.file.key, refused=refused)
        return
    for placement in placed:
        joined = await deps.buckets.add_file(placement, event)
        deps.timers.arm(joined.bucket_id, joined.closes_at)
        log.debug("file_bucketed", bucket_id=joined.bucket_id, application_id=placement.application)


async def run_timers(deps: DiscoveryDeps, stop: asyncio.Event) -> None:
    """Close buckets whose quiet period is over (background task of every replica)."""
    await deps.timers.run(stop)


def build(services: Services) -> DiscoveryDeps:
    """Wire the ports to the process's shared connections."""
    store = BucketStore(services.database)
    settings = services.settings.discovery
    bucket_timers = timers.BucketTimers(
        store,
        services.bus,
        services.database,
        sweep_interval_s=settings.sweep_interval_s,
        publish_lease_s=settings.publish_lease_s,
    )
    return DiscoveryDeps(RegistryCatalog(services.database, settings.catalog_ttl_s), store, bucket_timers)


CONSUMER = Consumer[DiscoveryDeps](
    name=NAME,
    handlers={PayloadArrived: handle},
    build_deps=build,
    indexes=(*buckets.INDEXES, *timers.INDEXES, *REGISTRY_INDEXES),
    background=(run_timers,),
)
