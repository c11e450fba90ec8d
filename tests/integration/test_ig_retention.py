"""``mwm cleanup`` removes the IG path's records, claims and bucket copies of a final task past the retention,
and nothing of an unfinished IG task (the IG emulator on the real broker, S3, database and dcmtk storescp)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from devkit.ig_emulator import Destination
from devkit.ig_loop import IG_CONSUMERS, add_ig_sink, ig_stack, request_export
from devkit.peers.dcmtk import StoreSCP
from devkit.pipeline import consumers_running, tap
from devkit.services import settings_env, wait_for
from schemas.events import ExportCompleted
from tests.support.cli import Cli
from wm.adapters.mongo import Database
from wm.adapters.objectstore import ObjectStore
from wm.config import Settings
from wm.domain.monai_ig import IG_EXPORTS_PREFIX
from wm.stores import exports
from wm.stores.ig_exports import IG_EXPORT_ANNOUNCEMENTS, IG_EXPORTS
from wm.stores.ig_retention import IgRemoved, IgRetention

pytestmark = pytest.mark.integration

OLD = datetime.now(UTC) - timedelta(days=30)
KINDS = ("IG export records", "IG announcement claims", "IG bucket objects")


async def footprint(database: Database, ig_objects: ObjectStore, task_id: str) -> tuple[int, int, int]:
    """What MWM keeps of an IG task: its hand-off record, its announcement claims, its copies in the IG's
    bucket (in the order of ``KINDS``)."""
    return (
        await database.collection(IG_EXPORTS).count_documents({"_id": task_id}),
        await database.collection(IG_EXPORT_ANNOUNCEMENTS).count_documents({"task_id": task_id}),
        len(await ig_objects.list(f"{IG_EXPORTS_PREFIX}{task_id}/")),
    )


def counted(output: str, verb: str, counts: tuple[int, int, int]) -> bool:
    return all(f"{verb} {kind}: {count}" in output for kind, count in zip(KINDS, counts, strict=True))


async def test_cleanup_removes_an_old_ig_tasks_traces_and_nothing_of_an_unfinished_one(
    live_settings: Settings, tmp_path: Path
) -> None:
    async with StoreSCP(tmp_path / "pacs", aet="STORESCP") as scp:
        pacs = {"PACS": Destination("STORESCP", scp.host, scp.port)}
        async with ig_stack(live_settings, "0.5", pacs) as (settings, emulator):
            await add_ig_sink(settings, "ig-pacs", ["PACS"])
            async with (
                Database(settings.mongo) as database,
                ObjectStore(settings.object_store) as objects,
            ):
                ig_objects = objects.in_bucket(settings.ig.bucket)

                async def stamped(task_id: str, field: str) -> bool:
                    found = await database.collection(IG_EXPORTS).find_one({"_id": task_id})
                    return found is not None and found.get(field) is not None

                async with (
                    tap(settings, ExportCompleted.event_type) as events,
                    consumers_running(settings, IG_CONSUMERS),
                ):
                    done = await request_export(settings, tmp_path / "done", job_id="job-done")
                    await events.wait_for(ExportCompleted, 1, 60)
                    emulator.drop_completions = True  # the IG holds the second task: it stays in progress
                    await wait_for(lambda: stamped(done, "resolved_at"), 60, "the completion resolving it")
                    running = await request_export(settings, tmp_path / "running", job_id="job-running")
                    await wait_for(lambda: stamped(running, "published_at"), 60, "the second hand-off")
                # The finished task ended, was resolved and announced before the retention; the unfinished
                # one's hand-off looks as old (deadline long past, never resolved): its task decides.
                await database.collection(exports.EXPORT_TASKS).update_one(
                    {"_id": done}, {"$set": {"completed_at": OLD}}
                )
                await database.collection(IG_EXPORTS).update_one(
                    {"_id": done}, {"$set": {"resolved_at": OLD}}
                )
                await database.collection(IG_EXPORT_ANNOUNCEMENTS).update_many(
                    {"task_id": done}, {"$set": {"claimed_at": OLD, "published_at": OLD}}
                )
                await database.collection(IG_EXPORTS).update_one(
                    {"_id": running}, {"$set": {"deadline": OLD}}
                )
                # A copy left by a hand-off that was given up before it was recorded (no record, no task).
                (tmp_path / "stray.dcm").write_bytes(b"x")
                await ig_objects.put_file(
                    f"{IG_EXPORTS_PREFIX}job-gone.ig-pacs/b/k.dcm", tmp_path / "stray.dcm"
                )
                before = {t: await footprint(database, ig_objects, t) for t in (done, running)}
                cli = Cli(settings_env(settings))
                dry = await cli("cleanup", "--dry-run")
                after_dry_run = {t: await footprint(database, ig_objects, t) for t in (done, running)}
                cleaned = await cli("cleanup")
                again = await cli("cleanup")
                after = {t: await footprint(database, ig_objects, t) for t in (done, running)}
                # Every copy has aged past a cutoff of now: the stray one goes, the unfinished task's stay.
                aged = await IgRetention(database, ig_objects).clean_up(
                    datetime.now(UTC) + timedelta(seconds=1)
                )
                running_later = await footprint(database, ig_objects, running)
                stray_left = len(await ig_objects.list(f"{IG_EXPORTS_PREFIX}job-gone.ig-pacs/"))
    print(f"IG footprint (record, claims, objects) before: {before}\nafter: {after}")
    assert before[done] == (1, 1, 2) and before[running] == (1, 0, 2), before
    assert dry.code == 0 and counted(dry.out, "would remove", before[done]), dry.out + dry.err
    assert after_dry_run == before, "a dry run removes nothing"
    assert cleaned.code == 0 and counted(cleaned.out, "removed", before[done]), cleaned.out + cleaned.err
    assert counted(again.out, "removed", (0, 0, 0)), again.out
    assert after[done] == (0, 0, 0), after
    assert after[running] == before[running], "nothing of an unfinished task is touched"
    assert aged == IgRemoved(objects=1) and stray_left == 0
    assert running_later == before[running]
