"""The Export API for pull clients over HTTP (uvicorn on a free port) against the real services."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from devkit.dicom import write_ct_study
from devkit.pipeline import tap
from devkit.services import wait_for
from schemas.events import ExportCompleted
from tests.support.api import assert_problem
from tests.support.exports import SINK, ServedApi, create_task, placeholder_files, served_api, upload
from wm.config import Settings


@pytest.fixture
async def api(live_settings: Settings) -> AsyncIterator[ServedApi]:
    async with served_api(live_settings) as served:
        yield served


async def claim(client: httpx.AsyncClient, owner: str, lease_s: float = 60) -> dict[str, Any] | None:
    response = await client.post("/exports/claim", json={"sink": SINK, "owner": owner, "lease_s": lease_s})
    assert response.status_code in (200, 204), response.text
    return response.json() if response.status_code == 200 else None


def quote(claimed: dict[str, Any]) -> dict[str, Any]:
    return {"owner": claimed["lease"]["owner"], "lease": claimed["lease"]["number"]}


async def test_two_clients_claiming_concurrently_never_get_the_same_task(api: ServedApi) -> None:
    for number in range(10):
        await create_task(api.tasks, f"job-{number}", placeholder_files(api.settings, f"job-{number}"))

    async def client_loop(owner: str) -> list[str]:
        held = []
        async with api.client() as client:
            while (claimed := await claim(client, owner)) is not None:
                assert claimed["task"]["lease_owner"] == owner and claimed["lease"]["owner"] == owner
                held.append(claimed["task"]["export_task_id"])
        return held

    first, second = await asyncio.gather(client_loop("client-a"), client_loop("client-b"))
    assert not set(first) & set(second), (first, second)
    assert len(first) + len(second) == len(set(first) | set(second)) == 10
    listing = (await api.admin.get("/exports", params={"sink": SINK, "state": "in_progress"})).json()
    assert listing["total"] == 10 and len(listing["items"]) == 10


async def test_a_client_that_dies_gives_the_task_back_after_its_lease(api: ServedApi) -> None:
    task_id = await create_task(api.tasks, "job-1", placeholder_files(api.settings, "job-1"))
    async with api.client() as dies, api.client() as survives:
        lost = await claim(dies, "dies", lease_s=1.0)
        assert lost is not None and lost["task"]["export_task_id"] == task_id
        assert await claim(survives, "survives") is None, "held while the lease lives"
        taken: list[dict[str, Any]] = []

        async def claimed_again() -> bool:
            taken.extend(filter(None, [await claim(survives, "survives")]))
            return bool(taken)

        await wait_for(claimed_again, 10, "the task to come back after the lease", interval=0.2)
        assert taken[0]["task"]["attempts"] == 2 and taken[0]["lease"]["number"] == 1
        late = await dies.put(f"/exports/{task_id}", json={**quote(lost), "final": True})
        assert_problem(late, 409)


async def test_only_the_lease_holder_may_update_extend_or_release(api: ServedApi) -> None:
    files = placeholder_files(api.settings, "job-1")
    task_id = await create_task(api.tasks, "job-1", files)
    async with api.client() as holder, api.client() as other:
        claimed = await claim(holder, "holder")
        assert claimed is not None
        forged = {**quote(claimed), "owner": "other"}
        progress = [{"key": files[0].key, "status": "succeeded"}]
        assert_problem(await other.put(f"/exports/{task_id}", json={**forged, "file_results": progress}), 409)
        assert_problem(await other.post(f"/exports/{task_id}/lease", json=forged), 409)
        assert_problem(await other.delete(f"/exports/{task_id}/lease", params=forged), 409)
        reported = await holder.put(f"/exports/{task_id}", json={**quote(claimed), "file_results": progress})
        assert reported.status_code == 200, reported.text
        assert reported.json()["state"] == "in_progress" and reported.json()["file_results"] == [
            {"key": files[0].key, "status": "succeeded", "error": None}
        ]
        extended = await holder.post(f"/exports/{task_id}/lease", json={**quote(claimed), "lease_s": 600})
        assert extended.json()["expires_at"] > claimed["lease"]["expires_at"]
        assert (await holder.delete(f"/exports/{task_id}/lease", params=quote(claimed))).status_code == 204
        assert (await api.tasks.get(task_id)).state == "pending"
    assert_problem(await api.admin.put("/exports/nosuch", json={"owner": "x", "lease": 0}), 404)


async def test_the_final_update_publishes_export_completed(api: ServedApi) -> None:
    files = placeholder_files(api.settings, "job-1", count=3)
    task_id = await create_task(api.tasks, "job-1", files)
    async with tap(api.settings, ExportCompleted.event_type) as events, api.client() as client:
        claimed = await claim(client, "client")
        assert claimed is not None
        await client.put(
            f"/exports/{task_id}",
            json={**quote(claimed), "file_results": [{"key": files[0].key, "status": "succeeded"}]},
        )
        results = [{"key": files[1].key, "status": "failed", "error": "C-STORE status 0xA700"}]
        final = await client.put(
            f"/exports/{task_id}", json={**quote(claimed), "file_results": results, "final": True}
        )
        assert final.status_code == 200, final.text
        [event] = await events.wait_for(ExportCompleted, 1, timeout=10)
        again = await client.put(f"/exports/{task_id}", json={**quote(claimed), "state": "succeeded"})
    assert final.json()["state"] == "partial" and again.json()["state"] == "partial"
    assert events.message_ids == [f"{task_id}.completed"]
    assert event.status == "partial" and event.export_task_id == task_id
    assert [(r.key, r.status) for r in event.file_results] == [
        (files[0].key, "succeeded"),
        (files[1].key, "failed"),
        (files[2].key, "failed"),
    ]
    assert (await api.tasks.get(task_id)).completion_published


async def test_download_returns_the_file_bytes(api: ServedApi, tmp_path: Path) -> None:
    study = write_ct_study(tmp_path / "study", slices_per_series=2, seed=5)
    files = await upload(api.settings, study.files, "job-1")
    task_id = await create_task(api.tasks, "job-1", files)
    async with api.client() as client:
        for index, path in enumerate(study.files):
            response = await client.get(f"/exports/{task_id}/files/{index}")
            assert response.status_code == 200, response.text
            assert response.headers["content-type"] == "application/dicom"
            assert response.content == path.read_bytes()
        assert_problem(await client.get(f"/exports/{task_id}/files/2"), 404)
        assert_problem(await client.get("/exports/nosuch/files/0"), 404)
    async with api.client(api.read_token) as reader:
        assert (await reader.get("/exports", params={"sink": SINK})).json()["total"] == 1
        assert_problem(await reader.get(f"/exports/{task_id}/files/0"), 403)
        assert_problem(await reader.post("/exports/claim", json={"sink": SINK, "owner": "r"}), 403)
    missing = await create_task(api.tasks, "job-2", placeholder_files(api.settings, "job-2"))
    assert_problem(await api.admin.get(f"/exports/{missing}/files/0"), 404)
