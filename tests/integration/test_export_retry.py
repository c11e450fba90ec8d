"""Export retry (issue #18): delayed redelivery while a PACS is down; an operator retries failed files."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

from devkit.dicom import write_ct_study
from devkit.peers import StoreSCP
from devkit.services import settings_env, wait_for
from schemas.events import FileRef
from tests.integration.test_exporter import (
    add_sink,
    completions,
    publish,
    request,
    running_exporter,
    with_export,
)
from tests.support.cli import Cli
from tests.support.exports import served_api
from wm.adapters.mongo import Database
from wm.adapters.objectstore import ObjectStore
from wm.config import Settings
from wm.domain.exports import ExportState, ExportTask
from wm.errors import NotFound
from wm.stores.exports import ExportTasks

OUTAGE_S = 90.0


async def ct_outputs(settings: Settings, directory: Path, slices: int) -> tuple[list[FileRef], list[Path]]:
    study = write_ct_study(directory, slices_per_series=slices, seed=slices)
    async with ObjectStore(settings.object_store) as objects:
        refs = [await objects.put_file(f"jobs/job-1/outputs/{path.name}", path) for path in study.files]
    return refs, list(study.files)


async def read_task(settings: Settings, task_id: str) -> ExportTask:
    async with Database(settings.mongo) as database:
        return await ExportTasks(database).get(task_id)


async def test_a_pacs_down_for_90_s_gets_the_export_once_it_is_back_without_an_operator(
    live_settings: Settings, tmp_path: Path
) -> None:
    settings = with_export(
        live_settings,
        retry_attempts=2,
        retry_initial_delay_s=0.2,
        acse_timeout_s=2.0,
        redelivery_initial_delay_s=2.0,
        redelivery_max_delay_s=10.0,
    )
    files, _ = await ct_outputs(settings, tmp_path / "out", slices=4)
    pacs = StoreSCP(tmp_path / "pacs")
    pacs.start()
    await add_sink(settings, "pacs", pacs.port, pacs.aet)
    pacs.stop()  # the PACS goes down
    down_at = time.monotonic()
    async with completions(settings) as seen, running_exporter(settings):
        await publish(settings, request("pacs", files))

        async def deferred() -> bool:
            try:
                return (await read_task(settings, "job-1.pacs")).retries >= 1
            except NotFound:  # the exporter creates the task from the request
                return False

        await wait_for(deferred, 60, "the export to be deferred", interval=0.5)
        waiting = await read_task(settings, "job-1.pacs")
        await asyncio.sleep(max(0.0, OUTAGE_S - (time.monotonic() - down_at)))
        assert not seen.events, "nothing is completed while the PACS is down"
        pacs.start()  # back, on the same port
        try:
            [event] = await seen.wait(1)
        finally:
            received = pacs.received_files()
            pacs.stop()
    done = await read_task(settings, "job-1.pacs")
    assert waiting.state is ExportState.pending and waiting.lease_owner is None, "no delivery held"
    assert waiting.retry_at is not None and "gave up after 2 attempts" in waiting.message
    assert event.status == "succeeded", event.message
    assert len(received) == 4
    assert done.retries >= 3, f"redelivered {done.retries} times over the {OUTAGE_S:.0f} s outage"
    print(f"export succeeded after {done.retries} delayed redeliveries over a {OUTAGE_S:.0f} s outage")


async def test_retrying_a_task_that_failed_on_2_of_10_files_sends_only_those_2(
    live_settings: Settings, tmp_path: Path
) -> None:
    async with served_api(live_settings) as api:
        settings = api.settings
        cli = Cli(settings_env(settings))
        files, paths = await ct_outputs(settings, tmp_path / "out", slices=10)
        missing = files[3], files[7]
        async with ObjectStore(settings.object_store) as objects:
            for ref in missing:
                await objects.remove_prefix(ref.key)  # lost from the store: these two fail
        with StoreSCP(tmp_path / "pacs") as pacs:
            await add_sink(settings, "pacs", pacs.port, pacs.aet)
            async with completions(settings) as seen, running_exporter(settings):
                await publish(settings, request("pacs", files))
                [first] = await seen.wait(1)
                first_received = len(pacs.received_files())
                listed = json.loads((await cli("exports", "list", "--state", "partial", "-o", "json")).out)
                async with ObjectStore(settings.object_store) as objects:
                    for ref in missing:  # put back
                        await objects.put_file(ref.key, next(p for p in paths if ref.key.endswith(p.name)))
                retried = await cli("exports", "retry", "job-1.pacs")
                [_, second] = await seen.wait(2)
                shown = await cli("exports", "show", "job-1.pacs")
                again = await cli("exports", "retry", "job-1.pacs")
            received = len(pacs.received_files())
    assert first.status == "partial"
    failed = [result.key for result in first.file_results if result.status == "failed"]
    assert failed == [ref.key for ref in missing] and first_received == 8
    assert [task["export_task_id"] for task in listed] == ["job-1.pacs"]
    assert retried.code == 0 and "2 file(s) to send again" in retried.out, retried.err
    assert second.status == "succeeded" and len(second.file_results) == 10
    assert received == 10, "only the 2 failed files were sent again"
    assert seen.message_ids == ["job-1.pacs.completed", "job-1.pacs.completed.r1"]
    assert shown.code == 0 and "state: succeeded" in shown.out and shown.out.count("succeeded") >= 10
    assert again.code == 1 and "(409)" in again.err
