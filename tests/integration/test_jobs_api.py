"""The jobs API over HTTP (uvicorn on a free port), on jobs the real pipeline made on the real services."""

from __future__ import annotations

from pathlib import Path

import httpx

from devkit.peers import free_port
from tests.support.api import api_settings, assert_problem
from tests.support.jobs import SLEEPER, job_finished, launch_job, pipeline_and_api
from wm.adapters.mongo import Database
from wm.config import Settings
from wm.stores.auth import ApiKeys


def client(settings: Settings, token: str | None = None) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {token or settings.api.token}"}
    return httpx.AsyncClient(base_url=settings.api.url, headers=headers)


async def read_key(settings: Settings) -> str:
    async with Database(settings.mongo) as database:
        _, token = await ApiKeys(database).create("reader", "read")
    return token


async def test_a_finished_job_is_listed_shown_and_cannot_be_cancelled(
    live_settings: Settings, tmp_path: Path
) -> None:
    settings = api_settings(live_settings, free_port())
    async with pipeline_and_api(settings) as events:
        launched = await launch_job(settings, events, tmp_path, "mip")
        finished = await job_finished(events, launched.job_id)
        async with client(settings, await read_key(settings)) as reader, client(settings) as admin:
            listing = (await reader.get("/jobs")).json()
            shown = (await reader.get(f"/jobs/{launched.job_id}")).json()
            assert_problem(await reader.post(f"/jobs/{launched.job_id}/cancel"), 403)
            refused = assert_problem(await admin.post(f"/jobs/{launched.job_id}/cancel"), 409)
            filtered = {
                query: (await reader.get("/jobs", params=params)).json()["total"]
                for query, params in {
                    "succeeded": {"state": "succeeded"},
                    "running": {"state": "running"},
                    "mip": {"application": "mip"},
                    "other": {"application": "other"},
                }.items()
            }
            assert_problem(await reader.get("/jobs", params={"state": "lost"}), 422)
            assert_problem(await reader.get("/jobs/job-unknown"), 404)
    assert finished.status == "succeeded", finished.message
    assert (listing["total"], listing["page"], [job["id"] for job in listing["items"]]) == (
        1,
        1,
        [launched.job_id],
    )
    assert shown == listing["items"][0]
    assert (shown["state"], shown["bucket_id"], shown["engine"]) == ("succeeded", launched.bucket_id, "local")
    assert (shown["application_id"], shown["application_revision"]) == ("mip", 1)
    assert shown["engine_job_id"] == launched.engine_job_id and shown["finished_at"] is not None
    assert [ref["key"] for ref in shown["outputs"]] == [ref.key for ref in finished.outputs] != []
    assert "already ended" in refused["detail"]
    assert filtered == {"succeeded": 1, "running": 0, "mip": 1, "other": 0}


async def test_cancelling_a_running_job_ends_it_cancelled(live_settings: Settings, tmp_path: Path) -> None:
    settings = api_settings(live_settings, free_port())
    async with pipeline_and_api(settings) as events, client(settings) as admin:
        launched = await launch_job(settings, events, tmp_path, "slow", command=SLEEPER)
        accepted = await admin.post(f"/jobs/{launched.job_id}/cancel")
        finished = await job_finished(events, launched.job_id, timeout=15)
        shown = (await admin.get(f"/jobs/{launched.job_id}")).json()
        again = await admin.post(f"/jobs/{launched.job_id}/cancel")
    assert accepted.status_code == 202, accepted.text
    assert accepted.json()["cancel_requested"] is True
    assert accepted.json()["state"] in ("launched", "running")
    assert (finished.status, finished.message) == ("cancelled", "cancelled on request")
    assert shown["state"] == "cancelled" and shown["finished_at"] is not None
    assert_problem(again, 409)
