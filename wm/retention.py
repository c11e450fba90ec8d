"""Retention: what MWM keeps for ``export.retention_days``, then removes (``mwm cleanup``).

Removed once older than the retention:

- final export tasks (by ``completed_at``) and their leases;
- a finished job's files: ``jobs/<job id>/`` in the object store (inputs and outputs) and its local work
  directory; the job record stays (marked ``purged_at``), so the history remains and a job is purged once;
- processed-message keys (the consumers' duplicate detection; a redelivery that old cannot happen);
- published job-finish claims (what keeps two monitor replicas from publishing one job's end; an ended
  job is not checked again).

Safe to run on any schedule, from several places at once: every removal is idempotent.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from wm.adapters.mongo import ProcessedMessages
from wm.adapters.objectstore import ObjectStore
from wm.engines.local import LocalEngine
from wm.exports import ExportTasks
from wm.jobs import JobStore


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
        ]


@dataclass(frozen=True)
class Stores:
    """Where retention removes from."""

    exports: ExportTasks
    jobs: JobStore
    objects: ObjectStore
    processed: ProcessedMessages
    work: LocalEngine


def cutoff_for(retention_days: int, now: datetime | None = None) -> datetime:
    """The instant before which things are removed."""
    return (now or datetime.now(UTC)) - timedelta(days=retention_days)


async def clean_up(stores: Stores, cutoff: datetime, dry_run: bool = False) -> Removed:
    """Remove everything older than ``cutoff`` (``dry_run``: count only)."""
    removed = Removed(cutoff)
    removed.export_tasks = await stores.exports.forget_before(cutoff, dry_run)
    for job in await stores.jobs.finished_before(cutoff):
        removed.objects += await _remove_objects(stores.objects, f"jobs/{job.job_id}/", dry_run)
        removed.work_dirs += await _remove_work_dir(stores.work, job.job_id, dry_run)
        removed.jobs.append(job.job_id)
        if not dry_run:
            await stores.jobs.mark_purged(job.job_id)
    removed.processed_messages = await stores.processed.forget_before(cutoff, dry_run)
    removed.finish_claims = await stores.jobs.forget_finishes_before(cutoff, dry_run)
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
