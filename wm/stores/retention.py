"""Retention: what MWM keeps for ``export.retention_days``, then removes (``mwm cleanup``).

Removed once older than the retention:

- final export tasks (by ``completed_at``) and their leases;
- a finished job's files: ``jobs/<job id>/`` in the object store (inputs and outputs) and its local work
  directory; the job record stays (marked ``purged_at``), so the history remains and a job is purged once;
- processed-message keys (the consumers' duplicate detection; a redelivery that old cannot happen);
- published job-finish claims (what keeps two monitor replicas from publishing one job's end; an ended
  job is not checked again);
- whole bucket keys (every generation's discovery documents) and the received files (``payloads/``) they
  point to, once every generation closed before the cutoff and no job made from them is unfinished; and
  payload objects nothing points to (refused or aborted C-STOREs) once older than the cutoff
  (``wm.stores.discovery_retention``). A retried job's attempts' work directories go with the job's.
- the MONAI Informatics Gateway path's hand-off records, announcement claims and the copies placed in the
  IG's bucket, of export tasks final before the cutoff (``wm.stores.ig_retention``).

Safe to run on any schedule, from several places at once: every removal is idempotent.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from wm.adapters.mongo import ProcessedMessages
from wm.adapters.objectstore import ObjectStore
from wm.engines.local import LocalEngine
from wm.stores.discovery_retention import DiscoveryRetention
from wm.stores.exports import ExportTasks
from wm.stores.ig_retention import IgRetention
from wm.stores.jobs import JobStore


@dataclass
class Removed:
    """What a cleanup removed (or, in a dry run, would remove)."""

    cutoff: datetime
    export_tasks: int = 0
    jobs: list[str] = field(default_factory=list)
    objects: int = 0
    work_dirs: int = 0
    processed_messages: int = 0
    finish_claims: int = 0
    bucket_keys: int = 0
    discovery_documents: int = 0
    payload_objects: int = 0
    ig_handoffs: int = 0
    ig_announcements: int = 0
    ig_objects: int = 0

    def lines(self) -> list[str]:
        """A human-readable account, one line per kind."""
        return [
            f"cutoff: {self.cutoff.isoformat()}",
            f"export tasks: {self.export_tasks}",
            f"jobs purged: {len(self.jobs)}" + (f" ({', '.join(self.jobs)})" if self.jobs else ""),
            f"objects: {self.objects}",
            f"work directories: {self.work_dirs}",
            f"processed-message keys: {self.processed_messages}",
            f"job finish claims: {self.finish_claims}",
            f"bucket keys: {self.bucket_keys}",
            f"discovery documents: {self.discovery_documents}",
            f"payload objects: {self.payload_objects}",
            f"IG export records: {self.ig_handoffs}",
            f"IG announcement claims: {self.ig_announcements}",
            f"IG bucket objects: {self.ig_objects}",
        ]


@dataclass(frozen=True)
class Stores:
    """Where retention removes from."""

    exports: ExportTasks
    jobs: JobStore
    objects: ObjectStore
    processed: ProcessedMessages
    work: LocalEngine
    discovery: DiscoveryRetention
    ig: IgRetention


def cutoff_for(retention_days: int, now: datetime | None = None) -> datetime:
    """The instant before which things are removed."""
    return (now or datetime.now(UTC)) - timedelta(days=retention_days)


async def clean_up(stores: Stores, cutoff: datetime, dry_run: bool = False) -> Removed:
    """Remove everything older than ``cutoff`` (``dry_run``: count only)."""
    removed = Removed(cutoff)
    removed.export_tasks = await stores.exports.forget_before(cutoff, dry_run)
    for job in await stores.jobs.finished_before(cutoff):
        removed.objects += await _remove_objects(stores.objects, f"jobs/{job.job_id}/", dry_run)
        runs = {job.job_id, job.engine_job_id, *(attempt.engine_job_id for attempt in job.attempts)}
        for run in sorted(run for run in runs if run):  # each attempt ran in a work directory of its own
            removed.work_dirs += await _remove_work_dir(stores.work, run, dry_run)
        removed.jobs.append(job.job_id)
        if not dry_run:
            await stores.jobs.mark_purged(job.job_id)
    removed.processed_messages = await stores.processed.forget_before(cutoff, dry_run)
    removed.finish_claims = await stores.jobs.forget_finishes_before(cutoff, dry_run)
    discovery = await stores.discovery.clean_up(cutoff, dry_run)
    removed.bucket_keys = discovery.bucket_keys
    removed.discovery_documents = discovery.documents
    removed.payload_objects = discovery.payload_objects
    ig = await stores.ig.clean_up(cutoff, dry_run)
    removed.ig_handoffs, removed.ig_announcements = ig.handoffs, ig.announcements
    removed.ig_objects = ig.objects
    return removed


async def _remove_objects(objects: ObjectStore, prefix: str, dry_run: bool) -> int:
    if dry_run:
        return len(await objects.list(prefix))
    return await objects.remove_prefix(prefix)


async def _remove_work_dir(work: LocalEngine, job_id: str, dry_run: bool) -> int:
    exists = await asyncio.to_thread(work.job_dir(job_id).exists)
    if exists and not dry_run:
        await work.cleanup(job_id)
    return int(exists)
