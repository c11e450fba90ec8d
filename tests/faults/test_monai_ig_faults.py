"""MWM behind the IG emulator through RabbitMQ restarts: the loop loses nothing (run by ``scripts/faults``).

RabbitMQ is restarted twice on this suite's own stack: once with the workflow request just published
(in MWM's IG queue, or being handled), once while the job runs (its application sleeps first), so its
end, its export request to the IG and the IG's completion all travel after the restart. Every queue is
durable and quorum, every message persistent, MWM's and the emulator's connections robust; the study
must still end exported with a result per file.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

from devkit.dicom import write_ct_study
from devkit.ig_emulator import Destination
from devkit.ig_loop import LOOP_CONSUMERS, add_ig_sink, ig_stack
from devkit.peers.dcmtk import StoreSCP
from devkit.pipeline import MIP_APP, consumers_running, mip_application, register
from devkit.services import services_command, wait_for
from tests.support.services import require_services
from wm.adapters.mongo import Database
from wm.config import Settings
from wm.domain.exports import ExportState, ExportTask
from wm.stores.exports import ExportTasks
from wm.stores.jobs import JOBS

JOB_SLEEP_S = 15  # the job ends during or just after the restart: its events travel after it


async def export_tasks(settings: Settings) -> list[ExportTask]:
    async with Database(settings.mongo) as database:
        return list((await ExportTasks(database).query()).items)


async def jobs(settings: Settings) -> list[object]:
    async with Database(settings.mongo) as database:
        return list(await database.collection(JOBS).find({}).to_list())


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
            slow = ["sh", "-c", f"sleep {JOB_SLEEP_S} && exec {sys.executable} {MIP_APP}"]
            await register(settings, mip_application(ae_title="MONAI-MIP", sinks=["ig-pacs"], command=slow))
            async with consumers_running(settings, LOOP_CONSUMERS):
                await emulator.send_study(study.files, called_ae="MONAI-MIP")
                await restart_rabbitmq()
                require_services(settings)

                async def job_created() -> bool:
                    return bool(await jobs(settings))

                await wait_for(job_created, 240, "the job")
                await restart_rabbitmq()

                async def task_final() -> bool:
                    tasks = await export_tasks(settings)
                    return bool(tasks) and all(task.is_final for task in tasks)

                await wait_for(task_final, 240, "the export task's end")
                received = await scp.await_files(2, timeout=30)
    [task] = await export_tasks(settings)
    assert task.state is ExportState.succeeded, task.message
    assert task.completion_published, "its mwm.export.completed was confirmed by the broker"
    assert len(task.file_results) == 2 and {r.status for r in task.file_results} == {"succeeded"}
    assert len(received) == 2
