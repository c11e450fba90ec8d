"""The real ``mwm export-client --once`` as a subprocess: API (served by the test) -> dcmtk storescp."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pydicom

from devkit.dicom import write_ct_study
from devkit.peers import LOCALHOST, StoreSCP, free_port
from devkit.services import settings_env, wait_for
from tests.support.cli import Cli, finished
from tests.support.exports import SINK, create_task, served_api, upload
from wm.config import Settings
from wm.domain.exports import ExportState


def datasets_by_sop(paths: list[Path]) -> dict[str, pydicom.Dataset]:
    return {str(ds.SOPInstanceUID): ds for ds in (pydicom.dcmread(path) for path in paths)}


async def test_the_export_client_delivers_a_task_to_storescp(live_settings: Settings, tmp_path: Path) -> None:
    study = write_ct_study(tmp_path / "study", slices_per_series=5, seed=11)
    async with served_api(live_settings) as api:
        files = await upload(api.settings, study.files, "job-1")
        task_id = await create_task(api.tasks, "job-1", files)
        async with StoreSCP(tmp_path / "scp", aet="PACS", bit_preserving=True) as scp:
            cli = Cli(settings_env(api.settings))
            result = await cli(
                "export-client",
                *("--sink", SINK, "--ae-title", "PACS", "--host", LOCALHOST, "--port", str(scp.port)),
                *("--token", api.gateway_token, "--once"),
            )
            received = scp.received_files()
        task = await api.tasks.get(task_id)
        nothing_left = await cli(
            "export-client",
            "--sink",
            SINK,
            "--ae-title",
            "PACS",
            "--host",
            LOCALHOST,
            "--port",
            "1",
            "--token",
            api.gateway_token,
            "--once",
        )
    assert result.code == 0, result.err
    assert "exported 1 task(s)" in result.out
    assert task.state is ExportState.succeeded and task.completion_published
    assert [r.status for r in task.file_results] == ["succeeded"] * 5
    sent, got = datasets_by_sop(study.files), datasets_by_sop(received)
    assert set(got) == set(sent)
    for uid, original in sent.items():
        assert got[uid].PixelData == original.PixelData
        assert got[uid] == original, f"{uid}: the data set changed on the way"
    assert nothing_left.code == 0 and "exported 0 task(s)" in nothing_left.out


async def test_the_export_client_waits_for_a_destination_that_is_down_holding_its_lease(
    live_settings: Settings, tmp_path: Path
) -> None:
    # One association attempt per try, a 3 s lease (renewed every second), redeliveries from 1 s.
    export = live_settings.export.model_copy(
        update={
            "retry_attempts": 1,
            "acse_timeout_s": 2.0,
            "lease_s": 3.0,
            "redelivery_initial_delay_s": 1.0,
            "redelivery_max_delay_s": 2.0,
            "redelivery_window_s": 300.0,
        }
    )
    settings = live_settings.model_copy(update={"export": export})
    study = write_ct_study(tmp_path / "study", slices_per_series=5, seed=12)
    port = free_port()  # nothing listens there yet: the PACS is down
    async with served_api(settings) as api:
        files = await upload(api.settings, study.files, "job-2")
        task_id = await create_task(api.tasks, "job-2", files)
        client = await Cli(settings_env(api.settings)).spawn(
            "export-client",
            *("--sink", SINK, "--ae-title", "PACS", "--host", LOCALHOST, "--port", str(port)),
            *("--token", api.gateway_token, "--once"),
        )

        async def waiting() -> bool:
            return "sent again after" in (await api.tasks.get(task_id)).message

        await wait_for(waiting, 60, "the client to wait for the destination", interval=0.2)
        await asyncio.sleep(2 * settings.export.lease_s)  # two leases: held only if renewed
        held = await api.tasks.get(task_id)
        taken = await api.tasks.claim(SINK, "another-client", 60)
        async with StoreSCP(tmp_path / "scp", aet="PACS", port=port) as scp:  # the PACS is back
            result = await finished(client, timeout=120)
            received = scp.received_files()
        task = await api.tasks.get(task_id)
    assert held.state is ExportState.in_progress and held.lease_owner is not None, held
    assert taken is None, "the waiting client keeps its task: no other client takes it"
    assert result.code == 0, result.err
    assert "exported 1 task(s)" in result.out
    assert task.state is ExportState.succeeded, task.message
    assert [r.status for r in task.file_results] == ["succeeded"] * 5
    assert len(received) == 5
    assert task.attempts == 1, "one claim, renewed all along, never given up and taken again"
