"""The real ``mwm export-client --once`` as a subprocess: API (served by the test) -> dcmtk storescp."""

from __future__ import annotations

from pathlib import Path

import pydicom

from devkit.dicom import write_ct_study
from devkit.peers import LOCALHOST, StoreSCP
from devkit.services import settings_env
from tests.support.cli import Cli
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
