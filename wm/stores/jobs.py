"""Jobs in MongoDB: one document per job, ``_id`` = the job id derived from its bucket.

Creating a job is an insert under the unique ``_id``: a duplicate ``bucket.ready`` finds the job that
exists. State changes go through the domain state machine (``wm.domain.jobs``); finishing a job is
claimed by a unique insert into ``job_finishes`` so one monitor replica publishes its ``job.finished``.

When its next status check is due lives apart from the job, in ``job_checks`` (one small document per job
not yet known to have ended): the monitor asks for due jobs every ``poll_interval_s``, and job records are
kept for the history, so a query over ``jobs`` would grow with every job ever run (the MongoDB-wire
server scans it: about 0.2 s per 1,000 jobs, four times a second). A check entry is written with the job
(again by a duplicate ``create``, which repairs one lost to a crash) and removed once the job has ended;
the monitor watches any unfinished job left out when it starts.

Finish claims are kept for the retention period too, so the monitor's look for stale ones (claimed, never
published: the claimer died) reads ``job_finish_watch`` instead, one small document per claim not yet
published (``_id`` = job id, ``watched_at``), and the claims themselves by ``_id``. An entry is written
before its claim (so no unpublished claim goes unwatched) and removed once the end is published or the
claim released; an entry left by a claimer that died between its two writes, or lost its claim race, is
removed by the first look that finds no unpublished claim behind it, once it is older than the lease.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

from pymongo import ASCENDING, IndexModel

from wm.adapters.mongo import (
    Database,
    IndexSpec,
    delete_matching,
    find_by_id,
    insert_new,
    reclaim_stale,
    translated_errors,
    upsert,
)
from wm.domain.jobs import TERMINAL, JobAttempt, JobState, JobTransition, next_state
from wm.domain.jobs import Job as Job  # the model lives in the domain; re-exported for the store's users
from wm.domain.jobs import finished_event as finished_event
from wm.domain.jobs import launched_event as launched_event
from wm.errors import Conflict

JOBS = "jobs"
FINISHES = "job_finishes"
CHECKS = "job_checks"
FINISH_WATCH = "job_finish_watch"

INDEXES = (
    IndexSpec(
        JOBS,
        (
            IndexModel([("application_id", ASCENDING), ("created_at", ASCENDING)]),
            IndexModel([("bucket_id", ASCENDING)]),
        ),
    ),
    IndexSpec(FINISHES, (IndexModel([("published_at", ASCENDING)]),)),
    IndexSpec(CHECKS, (IndexModel([("due_at", ASCENDING)]),)),
)
CHECKED_STATES = frozenset({JobState.launched, JobState.running})
"""The states in which an engine runs the job and the monitor follows it."""
LAUNCH_RECHECK = timedelta(minutes=1)
"""How long a job found still being launched waits for its next look (its ``job.launched`` makes it due)."""


def _now() -> datetime:
    return datetime.now(UTC)


def _document(job: Job) -> dict[str, Any]:
    document = job.model_dump(mode="python")
    document["_id"] = document.pop("job_id")
    document["outputs"] = [ref.model_dump() for ref in job.outputs]
    document["attempts"] = [attempt.model_dump(mode="python") for attempt in job.attempts]
    return document


def _job(document: dict[str, Any]) -> Job:
    return Job.model_validate({**document, "job_id": document["_id"]})


class JobStore:
    """Job persistence for the scheduler, the monitor and the API."""

    def __init__(self, database: Database) -> None:
        self._jobs = database.collection(JOBS)
        self._finishes = database.collection(FINISHES)
        self._checks = database.collection(CHECKS)
        self._finish_watch = database.collection(FINISH_WATCH)

    async def create(self, job: Job) -> Job:
        """Insert the job, or return the one that already exists under its id; either way it is watched."""
        if not await insert_new(self._jobs, _document(job), "create job"):
            job = await self.get(job.job_id)
        if not job.terminal:
            await self._watch(job.job_id, job.created_at)
        return job

    async def get(self, job_id: str) -> Job:
        """The job; ``NotFound`` if there is none."""
        return _job(await find_by_id(self._jobs, job_id, "read job", f"job {job_id} does not exist"))

    async def apply(
        self, job_id: str, transition: JobTransition, *, current: Job | None = None, **fields: Any
    ) -> Job:
        """Move the job through ``transition`` (a repeat is a no-op; an illegal one raises).

        ``current``: the job as the caller last read it, which saves reading it again. The write only applies
        while the job is still in that state; if it moved on meanwhile, the job is read and the transition
        decided again from its real state.
        """
        job = current or await self.get(job_id)
        state = next_state(job.state, transition)
        changes: dict[str, Any] = {"state": state.value, "updated_at": _now(), **fields}
        if state in TERMINAL and job.finished_at is None:
            changes["finished_at"] = _now()
        if "outputs" in changes:
            changes["outputs"] = [ref.model_dump() for ref in changes["outputs"]]
        async with translated_errors("update job"):
            result = await self._jobs.update_one({"_id": job_id, "state": job.state.value}, {"$set": changes})
        if result.matched_count == 0:
            return await self.apply(job_id, transition, **fields)  # it changed under us: decide again
        if state in TERMINAL:
            await self._unwatch(job_id)
        return job.model_copy(update={"state": state, **fields})

    async def begin_attempt(self, job: Job, engine_job_id: str, deadline: datetime) -> Job:
        """Start the next attempt of an ended ``job``, launched as ``engine_job_id``
        (``wm.service_layer.job_retry``).

        The attempt that ended goes to the history. Written only while the job is still as read (state and
        attempt): of two concurrent retries one wins, the other gets ``Conflict``. The job's finish claim is
        dropped first, so the monitor can claim the new attempt's end; then the job is watched again.
        """
        ended = JobAttempt(
            attempt=job.attempt,
            engine_job_id=job.engine_job_id,
            state=job.state,
            message=job.message,
            started_at=job.attempt_started_at or job.created_at,
            finished_at=job.finished_at,
        )
        now = _now()
        changes = {
            "state": JobState.launched.value,
            "attempt": job.attempt + 1,
            "attempt_started_at": now,
            "engine_job_id": engine_job_id,
            "deadline": deadline,
            "message": "",
            "outputs": [],
            "cancel_requested": False,
            "finished_at": None,
            "updated_at": now,
        }
        async with translated_errors("start job attempt"):
            await self._finishes.delete_one({"_id": job.job_id})
            result = await self._jobs.update_one(
                {"_id": job.job_id, "state": job.state.value, "updated_at": job.updated_at},
                {"$set": changes, "$push": {"attempts": ended.model_dump(mode="python")}},
            )
        if result.matched_count == 0:
            raise Conflict(f"job {job.job_id} changed while it was being retried; look at it again")
        await self.check_again_at(job.job_id, now)
        return await self.get(job.job_id)

    async def due_for_check(self, now: datetime, limit: int = 200) -> list[Job]:
        """Jobs an engine is running whose next status check is due (the longest due first)."""
        async with translated_errors("find jobs to check"):
            due = await self._checks.find({"due_at": {"$lte": now}}).sort("due_at", ASCENDING).to_list(limit)
            # One look-up by _id per entry, not one `$in` query: the MongoDB-wire server scans for `$in`.
            documents = await asyncio.gather(*(self._jobs.find_one({"_id": entry["_id"]}) for entry in due))
        checked: list[Job] = []
        for entry, document in zip(due, documents, strict=True):
            job = None if document is None else _job(document)
            if job is None or job.terminal:  # ended (a replica died before unwatching it), or no such job
                await self._unwatch(entry["_id"])
            elif job.state in CHECKED_STATES:
                checked.append(job)
            else:  # still being launched: look again later, unless its launch has rescheduled it meanwhile
                async with translated_errors("schedule job check"):
                    await self._checks.update_one(
                        {"_id": job.job_id, "due_at": entry["due_at"]},
                        {"$set": {"due_at": now + LAUNCH_RECHECK}},
                    )
        return checked

    async def check_again_at(self, job_id: str, when: datetime) -> None:
        """Schedule the job's next status check (an entry lost to a crash is written again)."""
        async with translated_errors("schedule job check"):
            await self._checks.update_one({"_id": job_id}, {"$set": {"due_at": when}}, upsert=True)

    async def request_cancel(self, job_id: str) -> Job:
        """Ask the monitor to cancel the job at its next check, which is due now."""
        job = await self.get(job_id)
        async with translated_errors("request cancel"):
            await self._jobs.update_one({"_id": job_id}, {"$set": {"cancel_requested": True}})
        await self.check_again_at(job_id, _now())
        return job.model_copy(update={"cancel_requested": True})

    async def watch_unfinished(self) -> int:
        """Watch every job that has not ended, and every unpublished finish claim, not watched; how many.

        The monitor runs this once at start: it repairs what a failed write left out and takes in jobs and
        claims recorded before the watch lists existed. It reads every job and claim once (scans on the
        MongoDB-wire server).
        """
        unfinished = [state.value for state in JobState if state not in TERMINAL]
        async with translated_errors("find unfinished jobs"):
            ids = await self._jobs.distinct("_id", {"state": {"$in": unfinished}})
            watched = set(await self._checks.distinct("_id"))
            claims = await self._finishes.distinct("_id", {"published_at": None})
            claims_watched = set(await self._finish_watch.distinct("_id"))
        missing = [job_id for job_id in ids if job_id not in watched]
        for job_id in missing:
            await self._watch(job_id, _now())
        unwatched_claims = [job_id for job_id in claims if job_id not in claims_watched]
        for job_id in unwatched_claims:
            await self._watch_finish(job_id)
        return len(missing) + len(unwatched_claims)

    async def _watch(self, job_id: str, due_at: datetime) -> None:
        # A job watched already keeps its schedule.
        await insert_new(self._checks, {"_id": job_id, "due_at": due_at}, "watch job")

    async def _unwatch(self, job_id: str) -> None:
        async with translated_errors("unwatch job"):
            await self._checks.delete_one({"_id": job_id})

    async def page(
        self, state: str | None, application_id: str | None, skip: int, limit: int
    ) -> tuple[list[Job], int]:
        """A page of jobs, newest first, and the total that match."""
        query: dict[str, Any] = {}
        if state:
            query["state"] = state
        if application_id:
            query["application_id"] = application_id
        async with translated_errors("list jobs"):
            total = await self._jobs.count_documents(query)
            cursor = self._jobs.find(query).sort("created_at", -1).skip(skip).limit(limit)
            return [_job(doc) for doc in await cursor.to_list(None)], total

    async def claim_finish(self, job_id: str) -> bool:
        """True for exactly one caller per job: the one that publishes its end."""
        await self._watch_finish(job_id)
        claim = {"_id": job_id, "claimed_at": _now(), "published_at": None}
        return await insert_new(self._finishes, claim, "claim job finish")

    async def stale_finishes(self, older_than: timedelta, limit: int = 100) -> list[str]:
        """Finishes claimed but not published in time (the claimer died), at most ``limit``."""
        cutoff = _now() - older_than
        async with translated_errors("find stale finishes"):
            watched = await self._finish_watch.find().to_list(None)
            claims = await asyncio.gather(*(self._finishes.find_one({"_id": w["_id"]}) for w in watched))
        stale: list[str] = []
        for entry, claim in zip(watched, claims, strict=True):
            if claim is not None and claim["published_at"] is None:
                if claim["claimed_at"] <= cutoff:
                    stale.append(str(entry["_id"]))
            elif (
                entry["watched_at"] <= cutoff
            ):  # published, released, or lost: a fresh entry may be a claimer's
                async with translated_errors("unwatch job finish"):
                    await self._finish_watch.delete_one(
                        {"_id": entry["_id"], "watched_at": entry["watched_at"]}
                    )
        return stale[:limit]

    async def renew_finish(self, job_id: str) -> None:
        """The claimer is still at work: its unpublished claim is fresh again (``wm.leases.renewed``)."""
        async with translated_errors("renew job finish"):
            await self._finishes.update_one(
                {"_id": job_id, "published_at": None}, {"$set": {"claimed_at": _now()}}
            )

    async def reclaim_finish(self, job_id: str, older_than: timedelta) -> bool:
        """Take over a stale finish: one caller wins by re-stamping the claim time it read."""
        return await reclaim_stale(self._finishes, job_id, older_than, "reclaim job finish")

    async def release_finish(self, job_id: str) -> None:
        """Drop an unpublished finish claim, so the job's next check can claim its end again."""
        async with translated_errors("release job finish"):
            await self._finishes.delete_one({"_id": job_id, "published_at": None})
            await self._finish_watch.delete_one({"_id": job_id})

    async def mark_finish_published(self, job_id: str) -> None:
        """The end of the job was published (confirmed by the broker)."""
        async with translated_errors("mark finish published"):
            await self._finishes.update_one({"_id": job_id}, {"$set": {"published_at": _now()}})
            await self._finish_watch.delete_one({"_id": job_id})

    async def _watch_finish(self, job_id: str) -> None:
        await upsert(
            self._finish_watch, {"_id": job_id}, {"$set": {"watched_at": _now()}}, "watch job finish"
        )

    async def forget_finishes_before(self, cutoff: datetime, dry_run: bool = False) -> int:
        """Remove finish claims published before ``cutoff``; how many (``dry_run``: counts).

        A claim keeps a second replica from publishing a job's end; an ended job is no longer checked, so an
        old claim guards nothing, and the stale-finish sweep reads every claim kept.
        """
        criteria = {"published_at": {"$lt": cutoff}}
        return await delete_matching(self._finishes, criteria, "purge finish claims", dry_run)

    async def finished_before(self, cutoff: datetime, limit: int = 500) -> list[Job]:
        """Jobs that ended before ``cutoff`` whose files are not purged yet (retention)."""
        query = {"finished_at": {"$lt": cutoff}, "purged_at": None}
        async with translated_errors("find finished jobs"):
            return [_job(doc) for doc in await self._jobs.find(query).limit(limit).to_list(None)]

    async def mark_purged(self, job_id: str) -> None:
        """Record that the job's files (object store, work directory) were removed."""
        async with translated_errors("mark job purged"):
            await self._jobs.update_one({"_id": job_id}, {"$set": {"purged_at": _now()}})
