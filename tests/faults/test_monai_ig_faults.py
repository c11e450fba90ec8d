"""MWM behind the IG emulator through RabbitMQ restarts: the loop loses nothing (run by ``scripts/faults``).

RabbitMQ is restarted twice on this suite's own stack: once with the workflow request just published
(in MWM's IG queue, or being handled), once with the export task created (its request on its way to the
IG, or the IG sending it). Every queue is durable and quorum, every message persistent, MWM's and the
emulator's connections robust; the study must still end exported with a result per file.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tests.support.ig_emulator import Destination
from tests.support.ig_loop import LOOP_CONSUMERS, add_ig_sink, ig_stack
from tests.support.pipeline import consumers_running, mip_application, register
from tests.support.services import require_services, services_command, wait_for
from wm.adapters.mongo import Database
from wm.config import Settings
from wm.domain.exports import ExportState, ExportTask
from wm.exports import ExportTasks
from wm.testing.dicom import write_ct_study
from wm.testing.peers.dcmtk import StoreSCP


async def export_tasks(settings: Settings) -> list[ExportTask]:
    async with Database(settings.mongo) as database:
        return list((await ExportTasks(database).query()).items)


async def restart_rabbitmq() -> None:
    await asyncio.to_thread(services_command, "restart", "rabbitmq")


@pytest.mark.timeout(600)
async def test_a_broker_restart_in_the_middle_of_the_ig_loop_loses_nothing(
    live_settings: Settings, tmp_path: Path
) -> None:
    study = write_ct_study(tmp_path / "study", series=2, slices_per_series=3, seed=31)
    async with StoreSCP(tmp_path / "pacs", aet="STORESCP") as scp:
        pacs = {"PACS": Destination("STORESCP", scp.host, scp.port)}
        async with ig_stack(live_settings, "0.4", pacs) as (settings, emulator):
            await add_ig_sink(settings, "ig-pacs", ["PACS"])
            await register(settings, mip_application(ae_title="MONAI-MIP", sinks=["ig-pacs"]))
            async with consumers_running(settings, LOOP_CONSUMERS):
                await emulator.send_study(study.files, called_ae="MONAI-MIP")
                await restart_rabbitmq()
                require_services(settings)

                async def task_created() -> bool:
                    return bool(await export_tasks(settings))

                await wait_for(task_created, 240, "the export task")
                await restart_rabbitmq()

                async def task_final() -> bool:
                    return all(task.is_final for task in await export_tasks(settings))

                await wait_for(task_final, 240, "the export task's end")
                received = await scp.await_files(2, timeout=30)
    [task] = await export_tasks(settings)
    assert task.state is ExportState.succeeded, task.message
    assert len(task.file_results) == 2 and {r.status for r in task.file_results} == {"succeeded"}
    assert len(received) == 2
