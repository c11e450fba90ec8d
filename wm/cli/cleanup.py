"""``mwm cleanup``: remove what is older than the retention (``MWM_EXPORT__RETENTION_DAYS``); see
`wm.stores.retention`. Run it by hand or periodically (a Kubernetes CronJob: docs/deployment.md)."""

from __future__ import annotations

import asyncio
from typing import Annotated

import typer

from wm.adapters.mongo import PROCESSED_MESSAGES_INDEXES, Database, ProcessedMessages
from wm.adapters.objectstore import ObjectStore
from wm.config import Settings
from wm.engines.local import LocalEngine, LocalEngineSettings
from wm.errors import MwmError
from wm.stores import buckets, exports, ig_exports, jobs
from wm.stores.discovery_retention import DiscoveryRetention
from wm.stores.ig_retention import IgRetention
from wm.stores.retention import Removed, Stores, clean_up, cutoff_for


def cleanup(
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="print what would be removed; remove nothing")
    ] = False,
) -> None:
    """Remove export tasks, job files, discovery documents, received files, processed-message keys and
    the IG path's records and copies older than the retention (nothing an unfinished job or task needs)."""
    settings = Settings()
    try:
        removed = asyncio.run(_clean_up(settings, dry_run))
    except MwmError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc
    prefix = "would remove " if dry_run else "removed "
    for line in removed.lines():
        typer.echo(line if line.startswith("cutoff") else prefix + line)


async def _clean_up(settings: Settings, dry_run: bool) -> Removed:
    indexes = (
        *exports.INDEXES,
        *jobs.INDEXES,
        *buckets.INDEXES,
        *ig_exports.INDEXES,
        PROCESSED_MESSAGES_INDEXES,
    )
    async with Database(settings.mongo, indexes) as database, ObjectStore(settings.object_store) as objects:
        stores = Stores(
            exports.ExportTasks(database),
            jobs.JobStore(database),
            objects,
            ProcessedMessages(database),
            LocalEngine(LocalEngineSettings.of(settings)),
            DiscoveryRetention(database, objects),
            # The IG's bucket exists only where the IG path is on.
            IgRetention(database, objects.in_bucket(settings.ig.bucket) if settings.ig.enabled else None),
        )
        return await clean_up(stores, cutoff_for(settings.export.retention_days), dry_run)
